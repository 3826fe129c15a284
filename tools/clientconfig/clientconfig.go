// Package clientconfig finds the metad endpoint the `basalt` CLI talks to. The endpoint comes from, in order:
// the --endpoint flag, the BASALT_ENDPOINT environment variable, the client config file that `basalt up`
// writes ($XDG_CONFIG_HOME/basalt/config, by default ~/.config/basalt/config), and finally metad's default
// address. It depends only on the standard library.
package clientconfig

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// EnvEndpoint is the environment variable that names the endpoint.
const EnvEndpoint = "BASALT_ENDPOINT"

// DefaultEndpoint is metad's default API address.
const DefaultEndpoint = "127.0.0.1:7400"

// Config is the client config file.
type Config struct {
	// Endpoint is a metad API address, host:port.
	Endpoint string `json:"endpoint"`
	// DataDir is where the `basalt up` cluster that wrote this file keeps its data, for the operator's
	// information.
	DataDir string `json:"data_dir,omitempty"`
}

// Path returns the client config file's path.
func Path() (string, error) {
	dir := os.Getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("find the client config: %w (set XDG_CONFIG_HOME)", err)
		}
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "basalt", "config"), nil
}

// Load reads the config file at path; a missing file is an empty config, not an error.
func Load(path string) (Config, error) {
	var c Config
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return c, fmt.Errorf("read client config: %w", err)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("client config %s is not valid JSON: %w", path, err)
	}
	return c, nil
}

// Save writes the config file atomically (temporary file and rename).
func Save(path string, c Config) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(path), err)
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return fmt.Errorf("encode client config: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write client config: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write client config: %w", err)
	}
	return nil
}

// Resolve picks the endpoint: flagValue if non-empty, else the environment, else the config file at path,
// else the default. It also says where the endpoint came from, for error messages.
func Resolve(flagValue, path string) (endpoint, source string, err error) {
	if flagValue != "" {
		return flagValue, "--endpoint", nil
	}
	if v := os.Getenv(EnvEndpoint); v != "" {
		return v, EnvEndpoint, nil
	}
	if path != "" {
		c, err := Load(path)
		if err != nil {
			return "", "", err
		}
		if c.Endpoint != "" {
			return c.Endpoint, path, nil
		}
	}
	return DefaultEndpoint, "the default", nil
}
