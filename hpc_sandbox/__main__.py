"""`python -m hpc_sandbox ...` is the same as `hpc-sandbox ...` (jobspecs use this form
so that the node runs the interpreter they name, whatever is on PATH)."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="hpc-sandbox")
