package main

import "github.com/kpfree/kpfree/test/kubeenv"

func bulkOpts(o kubeenv.Options, bulk bool) kubeenv.Options { return o }
