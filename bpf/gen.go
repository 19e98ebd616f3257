package bpf

// The generated sockLB* files are committed: `go build` needs neither clang
// nor the kernel headers. Regenerate after editing sock_lb.c (needs clang,
// libbpf-dev and the UAPI headers) with `go generate ./bpf/`.

//go:generate go tool bpf2go -tags linux -target amd64 -type svc_key -type svc_val -type backend_val -type revnat_val -type aff_key -type aff_val -type aff_match_key -type sock_key -type sock_val -type ct_key -type ct_val -type src_range_key -type maglev_val -type dev_val sockLB sock_lb.c -- -I/usr/include/x86_64-linux-gnu -O2 -g -Wall

// The tc programs (nodeport.c) share kpf_maps.h: the loader hands them the
// socket LB's map objects (MapReplacements), so the types above serve both.
//go:generate go tool bpf2go -tags linux -target amd64 nodePort nodeport.c -- -I/usr/include/x86_64-linux-gnu -O2 -g -Wall
