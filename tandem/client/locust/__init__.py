"""A locustfile for Tandem (`locustfile.py` here): run it with `locust -f`, not import it."""
