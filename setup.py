"""Package metadata for hpc-sandbox.

The design names setup.py, so plain setuptools is the whole build story:
`pip install .` (or `-e .`) is all a user or CI needs.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _package_data() -> list[str]:
    # Templates live at the top level (a sysadmin finds them without knowing the
    # package layout) and are shipped inside the package as hpc_sandbox/templates.
    return [str(p.relative_to(HERE / "templates")) for p in (HERE / "templates").rglob("*") if p.is_file()]


setup(
    name="hpc-sandbox",
    version="0.1.0",
    description="Sandbox slots for code-executing agents on HPC clusters (Slurm, PBS, Nomad) with Modal overflow",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hpc_sandbox", "hpc_sandbox.*"]) + ["hpc_sandbox.templates"],
    package_dir={"hpc_sandbox.templates": "templates"},
    package_data={"hpc_sandbox.templates": _package_data()},
    install_requires=[
        "aiohttp>=3.9",
        "click>=8.1",
        "jinja2>=3.1",
        "PyYAML>=6.0",
        "spython>=0.3",
        "python-nomad>=2.0",
        "cryptography>=41",  # the job's TLS certificate, made at submit
    ],
    extras_require={
        "modal": ["modal>=1.6"],
        "pyslurm": ["pyslurm"],
        "test": [
            "pytest>=7",
            "pytest-asyncio>=0.23",
            "pytest-timeout>=2.2",
            "hypothesis>=6",
            "python-hcl2>=4",
            # The cloud overflow's tests check every call against the real SDK's signatures.
            "modal>=1.6,<1.7",
        ],
    },
    entry_points={"console_scripts": ["hpc-sandbox=hpc_sandbox.cli:main"]},
)
