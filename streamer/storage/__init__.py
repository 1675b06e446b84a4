"""Storage under the root: IRSA names and every local path rule, the root check, the one durable atomic write, the one walker, the deleter."""
