"""voxq's tools: the `voxq` command, the Python client, the embedded dev stack."""
