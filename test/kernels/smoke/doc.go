// Package smoke holds a self-contained BPF smoke test for the kernel matrix
// (test/kernels): it proves that the VM image can load and attach the program
// kinds kpfree uses. Its tests run only inside a kernel-matrix VM
// (KPFREE_IN_VM=1) because they attach at the cgroup2 root.
package smoke
