package cloudhv

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/basalt-hv/basalt/computed/hypervisor"
)

// DiskAttacher makes a Basalt volume, reached over NBD, available as a path Cloud Hypervisor can open.
type DiskAttacher interface {
	Attach(ctx context.Context, d hypervisor.Disk) (AttachedDisk, error)
}

// AttachedDisk is one attached volume.
type AttachedDisk interface {
	// Path is the block device (or file) Cloud Hypervisor opens.
	Path() string
	// Detach disconnects the volume. Nothing may use Path any more.
	Detach(ctx context.Context) error
}

// The kernel NBD ioctls (include/uapi/linux/nbd.h): _IO(0xab, n).
const (
	nbdSetSock    = 0xab00
	nbdSetBlksize = 0xab01
	nbdSetSize    = 0xab02
	nbdDoIt       = 0xab03
	nbdClearSock  = 0xab04
	nbdDisconnect = 0xab08
	nbdSetTimeout = 0xab09
	nbdSetFlags   = 0xab0a
)

// KernelNBD attaches volumes as kernel NBD devices (/dev/nbdN) through the NBD ioctl interface: it does the
// handshake itself (NBDHandshake), gives the connected socket to a free device with NBD_SET_SOCK, sets the
// size, block size and flags the server reported, and runs NBD_DO_IT on a dedicated thread for as long as the
// device lives.
//
// It needs the nbd kernel module (modprobe nbd) and CAP_SYS_ADMIN. Two properties of the ioctl interface
// matter for computed:
//   - NBD_DO_IT blocks in the calling thread for the device's whole life, and the kernel tears the device down
//     when that wait is interrupted. The thread therefore blocks every signal, and each attached disk holds one
//     OS thread.
//   - The device lives only as long as this process: when computed exits or restarts, its NBD devices are
//     disconnected and the guests' disks fail. The kernel's netlink NBD interface (NBD_CMD_CONNECT) does not
//     have that limitation and is what a restart-safe attacher should use.
type KernelNBD struct {
	// Timeout is the per-request timeout given to the kernel (NBD_SET_TIMEOUT); 0 keeps the kernel's default.
	Timeout time.Duration
	Logger  *slog.Logger

	// claim serializes finding and claiming a free device within this process: NBD_SET_SOCK is the claim,
	// and the kernel ties a device being set up to the thread that set it up.
	claim sync.Mutex
}

// kernelBlockSize picks the block size the kernel device uses: 512 unless the server needs bigger blocks.
// The kernel accepts powers of two from 512 to the page size.
func kernelBlockSize(exp NBDExport) (int, error) {
	bs := uint32(512)
	if exp.MinBlockSize > bs {
		bs = exp.MinBlockSize
	}
	page := uint32(os.Getpagesize())
	if bs > page || bs&(bs-1) != 0 {
		return 0, fmt.Errorf("export needs a block size of %d, which the kernel NBD client cannot use", bs)
	}
	return int(bs), nil
}

// Attach connects to d's export and binds it to a free /dev/nbdN.
func (k *KernelNBD) Attach(ctx context.Context, d hypervisor.Disk) (AttachedDisk, error) {
	log := k.Logger
	if log == nil {
		log = slog.Default()
	}
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "unix", d.NBDSocket)
	if err != nil {
		return nil, fmt.Errorf("attaching disk %s: connecting to NBD server: %w", d.ID, err)
	}
	exp, err := NBDHandshake(ctx, conn, d.Export)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("attaching disk %s: %w", d.ID, err)
	}
	blksize, err := kernelBlockSize(exp)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("attaching disk %s: %w", d.ID, err)
	}
	// File duplicates the descriptor in blocking mode, which is what the kernel expects of the socket.
	sock, err := conn.(*net.UnixConn).File()
	conn.Close()
	if err != nil {
		return nil, fmt.Errorf("attaching disk %s: getting the socket's descriptor: %w", d.ID, err)
	}
	flags := exp.Flags
	if d.ReadOnly {
		flags |= NBDFlagReadOnly
	}

	k.claim.Lock()
	dev, index, err := claimNBDDevice(sock)
	// The kernel holds its own reference to the socket once NBD_SET_SOCK succeeded.
	sock.Close()
	if err != nil {
		k.claim.Unlock()
		return nil, fmt.Errorf("attaching disk %s: %w", d.ID, err)
	}
	a := &nbdAttachment{path: fmt.Sprintf("/dev/nbd%d", index), dev: dev, done: make(chan struct{}), log: log}
	err = configureNBDDevice(dev, blksize, exp.Size, flags, k.Timeout)
	if err != nil {
		_ = unix.IoctlSetInt(int(dev.Fd()), nbdClearSock, 0)
		dev.Close()
		k.claim.Unlock()
		return nil, fmt.Errorf("attaching disk %s to %s: %w", d.ID, a.path, err)
	}
	go a.run()
	k.claim.Unlock()

	if err := waitNBDConnected(ctx, index, a.done); err != nil {
		detachCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if derr := a.Detach(detachCtx); derr != nil {
			log.Warn("releasing NBD device after a failed attach", "device", a.path, "err", derr)
		}
		return nil, fmt.Errorf("attaching disk %s to %s: %w", d.ID, a.path, err)
	}
	log.Info("attached NBD export", "disk", d.ID, "export", d.Export, "device", a.path, "size", exp.Size,
		"flags", fmt.Sprintf("%#x", flags), "block_size", blksize)
	return a, nil
}

// claimNBDDevice finds a /dev/nbdN without a socket and gives it sock. A device in use answers NBD_SET_SOCK
// with EBUSY, which makes the ioctl itself the claim.
func claimNBDDevice(sock *os.File) (*os.File, int, error) {
	for i := 0; ; i++ {
		path := fmt.Sprintf("/dev/nbd%d", i)
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			if i == 0 {
				return nil, 0, errors.New("no /dev/nbd0: the nbd kernel module is not loaded (modprobe nbd)")
			}
			return nil, 0, fmt.Errorf("all %d NBD devices are in use (raise the nbd module's nbds_max)", i)
		}
		// A connected device has a pid attribute; skip it without opening it.
		if _, err := os.Stat(fmt.Sprintf("/sys/block/nbd%d/pid", i)); err == nil {
			continue
		}
		dev, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, 0, fmt.Errorf("opening %s: %w", path, err)
		}
		err = unix.IoctlSetInt(int(dev.Fd()), nbdSetSock, int(sock.Fd()))
		if errors.Is(err, unix.EBUSY) {
			dev.Close()
			continue
		}
		if err != nil {
			dev.Close()
			return nil, 0, fmt.Errorf("NBD_SET_SOCK on %s: %w", path, err)
		}
		return dev, i, nil
	}
}

func configureNBDDevice(dev *os.File, blksize int, size uint64, flags uint16, timeout time.Duration) error {
	fd := int(dev.Fd())
	if err := unix.IoctlSetInt(fd, nbdSetBlksize, blksize); err != nil {
		return fmt.Errorf("NBD_SET_BLKSIZE %d: %w", blksize, err)
	}
	if err := unix.IoctlSetInt(fd, nbdSetSize, int(size)); err != nil {
		return fmt.Errorf("NBD_SET_SIZE %d: %w", size, err)
	}
	if err := unix.IoctlSetInt(fd, nbdSetFlags, int(flags)); err != nil {
		return fmt.Errorf("NBD_SET_FLAGS %#x: %w", flags, err)
	}
	if timeout > 0 {
		if err := unix.IoctlSetInt(fd, nbdSetTimeout, int(timeout/time.Second)); err != nil {
			return fmt.Errorf("NBD_SET_TIMEOUT %s: %w", timeout, err)
		}
	}
	return nil
}

// waitNBDConnected waits until the kernel has started the device (it then publishes /sys/block/nbdN/pid), or
// NBD_DO_IT has returned, which means it failed.
func waitNBDConnected(ctx context.Context, index int, done <-chan struct{}) error {
	pidFile := fmt.Sprintf("/sys/block/nbd%d/pid", index)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := os.Stat(pidFile); err == nil {
			return nil
		}
		select {
		case <-done:
			return errors.New("NBD_DO_IT returned before the device was connected")
		case <-ctx.Done():
			return fmt.Errorf("waiting for the device to connect: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

type nbdAttachment struct {
	path string
	log  *slog.Logger

	// mu guards dev against being closed (and its descriptor number reused) while Detach uses it.
	mu     sync.Mutex
	dev    *os.File
	closed bool
	// done is closed when NBD_DO_IT has returned and the device has been released.
	done chan struct{}
	// doItErr is what NBD_DO_IT returned; read only after done is closed.
	doItErr error
}

func (a *nbdAttachment) Path() string { return a.path }

// run serves the device: NBD_DO_IT returns only on disconnect or a dead connection.
func (a *nbdAttachment) run() {
	// The thread is never unlocked, so it exits with this goroutine and its signal mask goes with it.
	runtime.LockOSThread()
	// A signal delivered to this thread during NBD_DO_IT makes the kernel shut the device down; Go's runtime
	// handles every signal, so a SIGCHLD or SIGPIPE for the process could land here. Block them all.
	var all unix.Sigset_t
	for i := range all.Val {
		all.Val[i] = ^uint64(0)
	}
	a.mu.Lock()
	fd := int(a.dev.Fd())
	a.mu.Unlock()
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
		a.doItErr = fmt.Errorf("blocking signals: %w", err)
	} else {
		a.doItErr = unix.IoctlSetInt(fd, nbdDoIt, 0)
	}
	if a.doItErr != nil {
		a.log.Warn("NBD device stopped", "device", a.path, "err", a.doItErr)
	}
	a.mu.Lock()
	_ = unix.IoctlSetInt(fd, nbdClearSock, 0)
	a.dev.Close()
	a.closed = true
	a.mu.Unlock()
	close(a.done)
}

// Detach disconnects the device and waits for NBD_DO_IT to return.
func (a *nbdAttachment) Detach(ctx context.Context) error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return nil
	}
	// NBD_DISCONNECT on the descriptor NBD_DO_IT is using is how the ioctl interface ends a device; a
	// concurrent ioctl on the same descriptor is fine.
	err := unix.IoctlSetInt(int(a.dev.Fd()), nbdDisconnect, 0)
	a.mu.Unlock()
	if err != nil {
		return fmt.Errorf("NBD_DISCONNECT on %s: %w", a.path, err)
	}
	select {
	case <-a.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for %s to disconnect: %w", a.path, ctx.Err())
	}
}
