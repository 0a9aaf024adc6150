"""hpc-sandbox: sandbox slots for code-executing agents on HPC clusters."""
__version__ = "0.1.0"
