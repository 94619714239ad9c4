"""The stage bodies, one module per kind; each is a function of (context, folder, **its parameters)."""
