"""Drop-in use of the projector in existing trainers and under data parallelism."""
