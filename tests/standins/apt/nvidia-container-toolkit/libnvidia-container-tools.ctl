# Stand-in for libnvidia-container-tools (tests only). Depends like the real package: any
# newer libnvidia-container1 satisfies it, which is why the role pins all four packages.
Section: misc
Priority: optional
Standards-Version: 3.9.2
Package: libnvidia-container-tools
Version: @VERSION@
Maintainer: wsl-triton-llm stand-in <standin@invalid>
Architecture: all
Depends: libnvidia-container1 (>= @VERSION@)
Files: nvidia-container-cli /usr/bin/
Description: STAND-IN libnvidia-container-tools for tests (not NVIDIA's)
 nvidia-container-cli answers --version only.
