"""A server: block backend, sessions and cache budget, gRPC servicer, announcer, composition root."""
