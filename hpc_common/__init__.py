"""What the agent and the launcher share: the message protocol, files on shared disks, walltime.

Standard library only (plus filelock, a dependency of the product); imports neither agent nor
launcher, so both may import it. See ARCHITECTURE.md for which module holds which concern.
"""
