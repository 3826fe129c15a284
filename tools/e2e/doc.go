// Package e2e holds Basalt's end-to-end tests: they build (or take from $BASALT_BIN_DIR) the real binaries and
// drive them as an operator does — `basalt up` in a temporary directory, the `basalt` CLI against it, daemons
// killed with SIGKILL. It has no code of its own outside its tests; it depends on tools/up for the port plan
// and the state file.
package e2e
