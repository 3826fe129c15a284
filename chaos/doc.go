// Package chaos is Basalt's fault-injection suite: its Go tests run the scenarios of chaos/scenario (kill,
// freeze, partition, disk full, etcd member loss) on multi-host clusters built by chaos/cluster, each host in
// its own network namespace, with the invariant checkers of chaos/check after every scenario. The default
// test run (`go test ./chaos/...`) runs the harness's self-tests and the kill-host scenario; BASALT_CHAOS=1
// runs every scenario; `make chaos` runs them through the basalt-chaos runner, and `make chaos ROUNDS=N` runs
// N randomized rounds. See chaos/README.md. The package has no code of its own outside its tests.
package chaos
