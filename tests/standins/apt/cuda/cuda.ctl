# Decoy (tests only): the `cuda` metapackage pulls the Linux driver in. On WSL it must never
# be installed; the role's apt pin makes its driver dependency uninstallable.
Section: misc
Priority: optional
Standards-Version: 3.9.2
Package: cuda
Version: 12.8.1-1
Maintainer: wsl-triton-llm stand-in <standin@invalid>
Architecture: all
Depends: cuda-toolkit-12-8 (>= 12.8.1-1), cuda-drivers (>= 570)
Description: STAND-IN decoy cuda metapackage for tests (not NVIDIA's)
 Depends on the driver, like the real one.
