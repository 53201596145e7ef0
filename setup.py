"""Packaging for clowder-hpc-agent: the agent (runs inside HPC allocations) and the launcher."""
from setuptools import find_packages, setup

setup(
    name="clowder-hpc-agent",
    version="0.1.0",
    description="Run unchanged pyclowder extractors on HPC allocations (PBS, Torque, Slurm)",
    python_requires=">=3.9",
    packages=find_packages(include=["agent", "agent.*", "launcher", "launcher.*"]),
    include_package_data=True,
    install_requires=[
        "requests>=2.28",
        "pika>=1.3,<2",
        "filelock>=3.8",
        "psutil>=5.9",
        "pyyaml>=6",
        "mpi4py>=3.1",
        "pyclowder==3.0.8",
        "aiohttp>=3.9",   # the relay's HTTP server and its Clowder client (launcher/relay)
        "uvloop>=0.17",   # the relay's event loop when present (about twice asyncio's speed)
    ],
    extras_require={
        # HPC sites bring their own MPI (mpi4py built against it); for development
        # and CI the MPICH wheel from PyPI is enough.
        "mpi": ["mpich"],
        "test": ["pytest>=7", "hypothesis>=6"],
    },
    entry_points={
        "console_scripts": [
            "clowder-agent=agent.__main__:main",
            "clowder-launcher=launcher.__main__:main",
        ]
    },
)
