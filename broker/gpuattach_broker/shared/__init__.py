"""Code both sides of a lease import: the kernel (jupyter_gpuattach) and the
agent and its workers (gpuattach_broker). Nothing here imports a
role's own modules or a role's own dependencies (IPython, NVML, the
broker's metrics), so a kernel can import it with only the base install.
"""
