"""Planning extensions: experiment planners that nnU-Net's planning API runs for ``entrust plan``."""
