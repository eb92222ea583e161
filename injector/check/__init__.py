"""`python -m injector check`: what a cluster lacks for injection, one verdict per line."""
