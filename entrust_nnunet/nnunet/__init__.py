"""The nnU-Net wiring: trainer hooks, schedule variants, planner, calibration fitting, predictor, environment."""
