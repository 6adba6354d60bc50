# Stand-in for NVIDIA's cuda-keyring (tests only). Like the real 1.1-1 package it ships the
# repository's signing key, the apt sources list of the repository and the 600 pin of the
# repository's packages; here they point at the stand-in repository served on the test bridge.
Section: misc
Priority: optional
Standards-Version: 3.9.2
Package: cuda-keyring
Version: 1.1-1
Maintainer: wsl-triton-llm stand-in <standin@invalid>
Architecture: all
Files: cuda-archive-keyring.gpg /usr/share/keyrings/
 cuda-wsl-ubuntu-x86_64.list /etc/apt/sources.list.d/
 cuda-repository-pin-600 /etc/apt/preferences.d/
Description: STAND-IN cuda-keyring for tests (not NVIDIA's)
 Installs the stand-in CUDA repository's key and sources list.
