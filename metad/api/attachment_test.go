package api_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	basaltv1 "github.com/basalt-hv/basalt/proto/basalt/v1"

	"github.com/basalt-hv/basalt/metad/clustermap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestAttachmentService drives AttachmentService over gRPC: attach, takeover, listing, fencing and detaching,
// and the codes of bad requests. (No storage node is up, so barriers pass at once; metad/attach and
// tools/e2e test them with real ones.)
func TestAttachmentService(t *testing.T) {
	c, s := serve(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := clustermap.Init(ctx, s); err != nil {
		t.Fatal(err)
	}
	vs, as := basaltv1.NewVolumeServiceClient(c), basaltv1.NewAttachmentServiceClient(c)
	for _, v := range []*basaltv1.CreateVolumeRequest{{Name: "boot", SizeBytes: 1 << 30}, {Name: "quorum", SizeBytes: 1 << 30, Shared: true}, {Name: "idle", SizeBytes: 1 << 30}} {
		if _, err := vs.CreateVolume(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	attach := func(vol, host string) *basaltv1.Attachment {
		t.Helper()
		a, err := as.Attach(ctx, &basaltv1.AttachRequest{Volume: vol, Host: host})
		if err != nil {
			t.Fatalf("Attach(%s, %s): %v", vol, host, err)
		}
		return a
	}
	list := func(vol string) string {
		t.Helper()
		resp, err := as.ListAttachments(ctx, &basaltv1.ListAttachmentsRequest{Volume: vol})
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, a := range resp.GetAttachments() {
			out = append(out, fmt.Sprintf("%s/%s:%d", a.GetVolume(), a.GetHost(), a.GetGeneration()))
		}
		return strings.Join(out, " ")
	}

	if a := attach("boot", "h1"); a.GetGeneration() != 1 || !a.GetExclusive() {
		t.Fatalf("Attach = %v", a)
	}
	attach("boot", "h2") // takeover
	attach("quorum", "h1")
	attach("quorum", "h2")
	if got := list(""); got != "boot/h2:2 quorum/h1:1 quorum/h2:2" {
		t.Fatalf("ListAttachments() = %q", got)
	}
	if got := list("quorum"); got != "quorum/h1:1 quorum/h2:2" {
		t.Fatalf("ListAttachments(quorum) = %q", got)
	}
	// The volume record carries them too (GetVolume is what an operator inspects).
	if v, err := vs.GetVolume(ctx, &basaltv1.GetVolumeRequest{Name: "boot"}); err != nil || v.GetAttachGeneration() != 2 || len(v.GetAttachments()) != 1 {
		t.Fatalf("GetVolume(boot) = %v, %v", v, err)
	}

	fence, err := as.FenceHost(ctx, &basaltv1.FenceHostRequest{Host: "h2"})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(fence.GetVolumes()) != "[boot quorum]" || fence.GetRevision() == 0 {
		t.Fatalf("FenceHost(h2) = %v", fence)
	}
	if got := list(""); got != "quorum/h1:1" {
		t.Fatalf("after fencing h2: %q", got)
	}
	if _, err := as.Detach(ctx, &basaltv1.DetachRequest{Volume: "quorum", Host: "h1"}); err != nil {
		t.Fatal(err)
	}
	if got := list(""); got != "" {
		t.Fatalf("after detach: %q", got)
	}

	for _, tc := range []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"attach unknown volume", func() error {
			_, err := as.Attach(ctx, &basaltv1.AttachRequest{Volume: "nope", Host: "h1"})
			return err
		}, codes.NotFound},
		{"attach without host", func() error { _, err := as.Attach(ctx, &basaltv1.AttachRequest{Volume: "boot"}); return err }, codes.InvalidArgument},
		{"attach bad volume name", func() error {
			_, err := as.Attach(ctx, &basaltv1.AttachRequest{Volume: "Boot", Host: "h1"})
			return err
		}, codes.InvalidArgument},
		{"detach unknown volume", func() error {
			_, err := as.Detach(ctx, &basaltv1.DetachRequest{Volume: "nope", Host: "h1"})
			return err
		}, codes.NotFound},
		{"list unknown volume", func() error {
			_, err := as.ListAttachments(ctx, &basaltv1.ListAttachmentsRequest{Volume: "nope"})
			return err
		}, codes.NotFound},
		{"fence without host", func() error { _, err := as.FenceHost(ctx, &basaltv1.FenceHostRequest{}); return err }, codes.InvalidArgument},
	} {
		if err := tc.call(); status.Code(err) != tc.code {
			t.Errorf("%s: %v, want %s", tc.name, err, tc.code)
		}
	}
}
