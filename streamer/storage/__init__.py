"""Storage under the root: path rules, the root check, durable atomic writes, the deleter, reconcile."""
