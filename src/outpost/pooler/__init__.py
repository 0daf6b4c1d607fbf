"""A PostgreSQL connection pooler: protocol handling, auth, routes, pools, admin console."""
