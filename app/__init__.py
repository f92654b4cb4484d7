"""fleetbridge: a GraphQL service joining an issue tracker to a fleet of AI coding agents."""
