"""Real deployment on Flower's Deployment Engine: federation keys, the operator's server,
and the site's client (see README.md, "Deployment")."""
