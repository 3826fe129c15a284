package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// daemonPackages are the programs a chaos cluster runs, by binary name.
var daemonPackages = map[string]string{
	"metad":          "github.com/basalt-hv/basalt/metad/cmd/metad",
	"blockd":         "github.com/basalt-hv/basalt/blockd/cmd/blockd",
	"computed":       "github.com/basalt-hv/basalt/computed/cmd/computed",
	etcdMemberBinary: "github.com/basalt-hv/basalt/chaos/cmd/basalt-chaos-etcd",
}

// TestBinaries finds the programs for tests: the daemons in $BASALT_BIN_DIR when it is set (`make test` builds
// them), else a fresh build into dir; the etcd member program from the same directory, or built into dir when
// it lacks it (`make build` does not build it). It runs the go command from the working directory, which must
// be inside the module (a test's is).
func TestBinaries(ctx context.Context, dir string) (binDir, etcdBin string, err error) {
	binDir = os.Getenv("BASALT_BIN_DIR")
	var build []string
	if binDir == "" {
		binDir = dir
		for name, pkg := range daemonPackages {
			if name != etcdMemberBinary {
				build = append(build, pkg)
			}
		}
	}
	etcdBin = filepath.Join(binDir, etcdMemberBinary)
	if _, err := os.Stat(etcdBin); err != nil {
		etcdBin = filepath.Join(dir, etcdMemberBinary)
		build = append(build, daemonPackages[etcdMemberBinary])
	}
	if len(build) == 0 {
		return binDir, etcdBin, nil
	}
	cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-o", dir + "/"}, build...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("build %v: %w: %s", build, err, out)
	}
	return binDir, etcdBin, nil
}
