"""Secret stores (file, AWS Secrets Manager) and the cache in front of them."""
