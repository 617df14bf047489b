"""Ray Tune: search the stage-2 mixing proportion and the weight-averaging coefficient."""
