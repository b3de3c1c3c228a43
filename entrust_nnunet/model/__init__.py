"""Networks (torch and dynamic-network-architectures only): EnTrust's parts and the uncertainty baselines."""
