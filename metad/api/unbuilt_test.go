package api

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestUnbuiltServicesSayWhatIsMissing: the interceptor rewrites the generated Unimplemented answer of a service
// listed as unbuilt into one naming what it lacks, and leaves every other answer alone.
func TestUnbuiltServicesSayWhatIsMissing(t *testing.T) {
	unbuilt["basalt.v1.TestService"] = "tests need a service that is not built"
	defer delete(unbuilt, "basalt.v1.TestService")
	generated := func(context.Context, any) (any, error) {
		return nil, status.Error(codes.Unimplemented, "method Do not implemented")
	}
	_, err := UnimplementedInterceptor(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/basalt.v1.TestService/Do"}, generated)
	if status.Code(err) != codes.Unimplemented || !strings.Contains(err.Error(), "Do is not available: tests need a service that is not built") {
		t.Errorf("unbuilt service: %v", err)
	}
	_, err = UnimplementedInterceptor(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/basalt.v1.VolumeService/Do"}, generated)
	if status.Convert(err).Message() != "method Do not implemented" {
		t.Errorf("built service: %v, want the generated answer untouched", err)
	}
}
