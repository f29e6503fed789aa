"""The parameter component: embedding tables, optimizer state, the serving store and delta sync.

It knows no graph and no stream engine: it imports neither model/ nor flows/."""
