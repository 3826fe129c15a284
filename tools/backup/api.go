package backup

import (
	"context"
	"fmt"
	"os"
	"strings"

	nbdclient "github.com/basalt-hv/basalt/blockd/nbd/client"
	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// VolumeAPI is the part of the VolumeService a backup uses. basaltv1.NewVolumeServiceClient satisfies it.
type VolumeAPI interface {
	GetVolume(ctx context.Context, in *basaltv1.GetVolumeRequest, opts ...grpc.CallOption) (*basaltv1.Volume, error)
	CreateVolume(ctx context.Context, in *basaltv1.CreateVolumeRequest, opts ...grpc.CallOption) (*basaltv1.Volume, error)
	DeleteVolume(ctx context.Context, in *basaltv1.DeleteVolumeRequest, opts ...grpc.CallOption) (*basaltv1.DeleteVolumeResponse, error)
	GetVolumeStatus(ctx context.Context, in *basaltv1.GetVolumeRequest, opts ...grpc.CallOption) (*basaltv1.VolumeStatus, error)
}

// CheckpointAPI is the part of the CheckpointService a backup uses. basaltv1.NewCheckpointServiceClient
// satisfies it.
type CheckpointAPI interface {
	CreateCheckpoint(ctx context.Context, in *basaltv1.CreateCheckpointRequest, opts ...grpc.CallOption) (*basaltv1.CreateCheckpointResponse, error)
	DeleteCheckpoint(ctx context.Context, in *basaltv1.DeleteCheckpointRequest, opts ...grpc.CallOption) (*basaltv1.DeleteCheckpointResponse, error)
	GetChangedExtents(ctx context.Context, in *basaltv1.GetChangedExtentsRequest, opts ...grpc.CallOption) (*basaltv1.GetChangedExtentsResponse, error)
}

// API is how a backup reaches the cluster.
type API struct {
	Volumes     VolumeAPI
	Checkpoints CheckpointAPI
}

// NewAPI is the API over a gRPC connection to metad.
func NewAPI(c grpc.ClientConnInterface) API {
	return API{Volumes: basaltv1.NewVolumeServiceClient(c), Checkpoints: basaltv1.NewCheckpointServiceClient(c)}
}

// exportURI returns the URI of export (a volume, or VOLUME@CHECKPOINT) on a blockd. With override (a blockd's
// nbd://HOST:PORT or nbd+unix:///?socket=PATH, from the user) that blockd is used; otherwise the volume's
// status lists every blockd that is up, and a Unix socket on this machine is preferred (no TCP in the data
// path), then the first TCP address.
func exportURI(ctx context.Context, api API, volume, export, override string) (string, error) {
	if override != "" {
		u, err := nbdclient.ParseURI(override)
		if err != nil {
			return "", err
		}
		if u.Export != "" && u.Export != export {
			return "", fmt.Errorf("NBD URI %q names export %q; give the blockd only (nbd://HOST:PORT or nbd+unix:///?socket=PATH): the export is %q", override, u.Export, export)
		}
		u.Export = export
		return u.String(), nil
	}
	st, err := api.Volumes.GetVolumeStatus(ctx, &basaltv1.GetVolumeRequest{Name: volume})
	if err != nil {
		return "", fmt.Errorf("find a blockd serving %s: %w", volume, apiError(err))
	}
	var tcp string
	for _, s := range st.GetNbdUris() {
		u, err := nbdclient.ParseURI(s)
		if err != nil {
			continue
		}
		u.Export = export
		if u.Network == "unix" {
			if _, err := os.Stat(u.Address); err == nil {
				return u.String(), nil
			}
			continue
		}
		if tcp == "" {
			tcp = u.String()
		}
	}
	if tcp == "" {
		return "", fmt.Errorf("no blockd serving %s is up (the volume's status lists no NBD URI: %s)", volume, strings.Join(st.GetNbdUris(), ", "))
	}
	return tcp, nil
}

// apiError makes an API error read as the API's message ("volume "x" does not exist"), not as gRPC's
// "rpc error: code = NotFound desc = ...", while keeping its status for status.Code and the CLI.
func apiError(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	return &statusError{st: st}
}

type statusError struct{ st *status.Status }

func (e *statusError) Error() string              { return e.st.Message() }
func (e *statusError) GRPCStatus() *status.Status { return e.st }
