package clientconfig

import (
	"os"
	"path/filepath"
	"testing"
)

func TestResolvePrecedence(t *testing.T) {
	path := filepath.Join(t.TempDir(), "basalt", "config")
	t.Setenv(EnvEndpoint, "")
	check := func(flag, wantEP, wantSource string) {
		t.Helper()
		ep, src, err := Resolve(flag, path)
		if err != nil || ep != wantEP || src != wantSource {
			t.Fatalf("Resolve(%q) = %q, %q, %v; want %q from %q", flag, ep, src, err, wantEP, wantSource)
		}
	}
	check("", DefaultEndpoint, "the default")
	if err := Save(path, Config{Endpoint: "127.0.0.1:9000", DataDir: "/d"}); err != nil {
		t.Fatal(err)
	}
	check("", "127.0.0.1:9000", path)
	t.Setenv(EnvEndpoint, "127.0.0.1:9001")
	check("", "127.0.0.1:9001", EnvEndpoint)
	check("127.0.0.1:9002", "127.0.0.1:9002", "--endpoint")
}

func TestLoadRejectsGarbageAndPathFollowsXDG(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", dir)
	p, err := Path()
	if err != nil || p != filepath.Join(dir, "basalt", "config") {
		t.Fatalf("Path = %q, %v", p, err)
	}
	os.MkdirAll(filepath.Dir(p), 0o700)
	os.WriteFile(p, []byte("{not json"), 0o600)
	if _, _, err := Resolve("", p); err == nil {
		t.Fatal("Resolve accepted a corrupt config file")
	}
}
