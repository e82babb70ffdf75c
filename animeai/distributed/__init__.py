"""Ray layer: Ray Train around ``engine.train``, Tune sweeps, fan-out. The only package that imports Ray."""
