// Package testserver replaces k8s.io/apiserver's pkg/storage/etcd3/testserver when
// etcd-gateway/storage-suite/run.sh runs the upstream storage tests: every RunEtcd starts a
// fresh KmMR cluster (`kmmr-replica local`, 4 replica processes, one of them Byzantine) and a
// fresh `kmmr-etcd-gateway` over it, on free ports, and hands the test a client of the gateway.
// The exported API (NewTestConfig, RunEtcd) is upstream's, so the upstream _test.go files
// compile and run unchanged; only the server behind the client is ours.
//
// Written for KmMR; the upstream file it stands in for is Copyright The Kubernetes Authors,
// Apache License 2.0.
package testserver

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
)

// Settings the run script passes in the environment.
const (
	envReplica   = "KMMR_SUITE_REPLICA"   // path of kmmr-replica
	envGateway   = "KMMR_SUITE_GATEWAY"   // path of kmmr-etcd-gateway
	envPgids     = "KMMR_SUITE_PGIDS"     // file: one process group a line, killed by the script at exit
	envLogs      = "KMMR_SUITE_LOGS"      // directory: a failed test's cluster and gateway logs
	envByzantine = "KMMR_SUITE_BYZANTINE" // "0" for no Byzantine replica (default: one, corrupt)
)

// How many replicas a cluster has (f = 1), and how long each start step may take. On two
// shared cores a cluster starts in a second or two; the bounds only catch a hang.
const (
	replicas     = 4
	startTimeout = 60 * time.Second
)

// NewTestConfig returns upstream's embedded etcd configuration. Nothing of it is started: the
// tests set a few fields (WatchProgressNotifyInterval) that RunEtcd passes on to the gateway.
func NewTestConfig(t testing.TB) *embed.Config {
	cfg := embed.NewConfig()
	cfg.Dir = t.TempDir()
	return cfg
}

// RunEtcd starts a fresh cluster and gateway and returns a client of the gateway, wrapped in
// the recorders the tests read, as upstream's does. Both are killed and their files removed
// when the test ends.
func RunEtcd(t testing.TB, cfg *embed.Config) *kubernetes.Client {
	t.Helper()
	if cfg == nil {
		cfg = NewTestConfig(t)
	}
	if cfg.ClientTLSInfo.CertFile != "" || cfg.ClientAutoTLS {
		// Only the storage tests' plain-TCP servers are stood in for: the gateway's TLS has
		// tests of its own.
		t.Fatalf("the KmMR test server does not serve TLS (ClientTLSInfo %+v)", cfg.ClientTLSInfo)
	}
	var s *server
	var err error
	// A port found free may be taken by another program before the replicas bind it; then
	// the start fails fast and a new layout is tried.
	for attempt := 1; attempt <= 3; attempt++ {
		s, err = start(t, cfg)
		if err == nil {
			break
		}
		t.Logf("KmMR test server: start %d failed: %v", attempt, err)
	}
	if err != nil {
		t.Fatalf("KmMR test server did not start: %v", err)
	}
	t.Cleanup(func() { s.stop(t) })

	client, err := kubernetes.New(clientv3.Config{
		Endpoints:   []string{s.endpoint},
		DialTimeout: 10 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithBlock()},
		Logger:      zaptest.NewLogger(t, zaptest.Level(zapcore.ErrorLevel)).Named("etcd-client"),
	})
	if err != nil {
		t.Fatal(err)
	}
	client.KV = storagetesting.NewKVRecorder(client.KV)
	client.Kubernetes = storagetesting.NewKubernetesRecorder(client.Kubernetes)
	return client
}

// server is one cluster and its gateway: one process group (the `local` process, the
// replicas it forks, and the gateway), so that one signal ends them all.
type server struct {
	dir      string
	base     int // the cluster's port layout, handed back when the processes are gone
	endpoint string
	local    *exec.Cmd
	gateway  *exec.Cmd
	pgid     int
	waited   chan struct{} // closed once both processes were reaped
	once     sync.Once
}

var (
	// Layouts handed out by this test binary, so that two tests never pick the same ports.
	portsMu    sync.Mutex
	handedOut  = map[int]bool{}
	pgidFileMu sync.Mutex
)

func start(t testing.TB, cfg *embed.Config) (*server, error) {
	replicaBin, gatewayBin := os.Getenv(envReplica), os.Getenv(envGateway)
	if replicaBin == "" || gatewayBin == "" {
		return nil, fmt.Errorf("%s and %s must name the KmMR binaries (run etcd-gateway/storage-suite/run.sh)", envReplica, envGateway)
	}
	dir, err := os.MkdirTemp("", "kmmr-suite-")
	if err != nil {
		return nil, err
	}
	s := &server{dir: dir, waited: make(chan struct{})}
	fail := func(err error) (*server, error) {
		s.kill()
		s.saveLogs(t, "start-failed")
		os.RemoveAll(dir)
		return nil, err
	}
	base, err := freeBasePort()
	if err != nil {
		return fail(err)
	}
	s.base = base
	clusterDir := filepath.Join(dir, "cluster")
	args := []string{"local", "--n", strconv.Itoa(replicas), "--dir", clusterDir,
		"--base-port", strconv.Itoa(base), "--keep-running"}
	if os.Getenv(envByzantine) != "0" {
		// Replica 0, the first leader, lies in every reply and flips bits in what it sends:
		// the tests must see no difference.
		args = append(args, "--byzantine", "1", "--byzantine-mode", "corrupt")
	}
	s.local = exec.Command(replicaBin, args...)
	// Its own process group, which the replicas it forks inherit: one kill ends them all.
	s.local.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	localLog, err := os.Create(filepath.Join(dir, "local.log"))
	if err != nil {
		return fail(err)
	}
	defer localLog.Close()
	s.local.Stderr = localLog
	localOut, err := s.local.StdoutPipe()
	if err != nil {
		return fail(err)
	}
	if err := s.local.Start(); err != nil {
		return fail(err)
	}
	s.pgid = s.local.Process.Pid
	recordPgid(strconv.Itoa(s.pgid))
	if _, err := waitLine(localOut, localLog, regexp.MustCompile(`^running \(Ctrl-C stops\)`)); err != nil {
		return fail(fmt.Errorf("cluster: %w (see local.log)", err))
	}

	gwArgs := []string{"--cluster", clusterDir, "--listen", "127.0.0.1:0"}
	if every := cfg.WatchProgressNotifyInterval; every > 0 {
		gwArgs = append(gwArgs, "--watch-progress-notify-interval", every.String())
	}
	s.gateway = exec.Command(gatewayBin, gwArgs...)
	s.gateway.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pgid: s.pgid}
	gwLog, err := os.Create(filepath.Join(dir, "gateway.log"))
	if err != nil {
		return fail(err)
	}
	defer gwLog.Close()
	s.gateway.Stderr = gwLog
	gwOut, err := s.gateway.StdoutPipe()
	if err != nil {
		return fail(err)
	}
	if err := s.gateway.Start(); err != nil {
		return fail(err)
	}
	line, err := waitLine(gwOut, gwLog, regexp.MustCompile(`^serving the etcd API on (http://\S+)`))
	if err != nil {
		return fail(fmt.Errorf("gateway: %w (see gateway.log)", err))
	}
	s.endpoint = line[1]
	go func() {
		// Reap both once they end, whoever ends them.
		_ = s.local.Wait()
		_ = s.gateway.Wait()
		close(s.waited)
	}()
	return s, nil
}

// waitLine reads stdout until a line matches (returning its submatches), copying every line
// into the log; the rest of the output keeps being copied so the process never blocks on a
// full pipe.
func waitLine(out io.Reader, log io.Writer, re *regexp.Regexp) ([]string, error) {
	found := make(chan []string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		sent := false
		for sc.Scan() {
			fmt.Fprintln(log, sc.Text())
			if m := re.FindStringSubmatch(sc.Text()); m != nil && !sent {
				found <- m
				sent = true
			}
		}
		if !sent {
			close(found)
		}
	}()
	select {
	case m, ok := <-found:
		if !ok {
			return nil, errors.New("exited before it was ready")
		}
		return m, nil
	case <-time.After(startTimeout):
		return nil, fmt.Errorf("not ready within %v", startTimeout)
	}
}

// stop ends the process group and removes the files; a failed test keeps its logs.
func (s *server) stop(t testing.TB) {
	s.kill()
	select {
	case <-s.waited:
		// Gone: the script must not signal this group id again, which may be reused.
		recordPgid(fmt.Sprintf("done %d", s.pgid))
	case <-time.After(15 * time.Second):
		t.Logf("KmMR test server: processes of group %d not reaped after SIGKILL", s.pgid)
	}
	if t.Failed() {
		s.saveLogs(t, "")
	}
	os.RemoveAll(s.dir)
	portsMu.Lock()
	delete(handedOut, s.base)
	portsMu.Unlock()
}

func (s *server) kill() {
	s.once.Do(func() {
		if s.pgid > 0 {
			// SIGKILL: nothing of a test's server is worth a graceful end, and the replicas'
			// children would otherwise outlive `local`.
			_ = syscall.Kill(-s.pgid, syscall.SIGKILL)
		}
	})
}

// saveLogs copies the cluster's and the gateway's logs where the run script shows them.
func (s *server) saveLogs(t testing.TB, suffix string) {
	root := os.Getenv(envLogs)
	if root == "" {
		return
	}
	name := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())
	if suffix != "" {
		name += "-" + suffix
	}
	dest := filepath.Join(root, fmt.Sprintf("%s-%d", name, time.Now().UnixNano()))
	if err := os.MkdirAll(dest, 0o755); err != nil {
		return
	}
	logs, _ := filepath.Glob(filepath.Join(s.dir, "*.log"))
	more, _ := filepath.Glob(filepath.Join(s.dir, "cluster", "*.log"))
	for _, f := range append(logs, more...) {
		if b, err := os.ReadFile(f); err == nil {
			_ = os.WriteFile(filepath.Join(dest, filepath.Base(f)), b, 0o644)
		}
	}
	t.Logf("KmMR test server logs: %s", dest)
}

// recordPgid appends a line to the run script's list of process groups: `<pgid>` when one
// starts, `done <pgid>` once it was reaped. At exit the script kills the groups not done: a
// test binary killed by its timeout runs no cleanups, and the processes must not outlive it.
func recordPgid(line string) {
	path := os.Getenv(envPgids)
	if path == "" {
		return
	}
	pgidFileMu.Lock()
	defer pgidFileMu.Unlock()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintln(f, line)
}

// freeBasePort finds B such that B..B+3, B+1000.. and B+2000.. (replica, client and HTTP ports
// of `kmmr-replica local`) are free, below the kernel's ephemeral range so that outgoing
// connections cannot take one in between (the same reasoning as kmmr::cluster::free_base_port).
func freeBasePort() (int, error) {
	low, high := 10000, 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil && v-low > 3000 {
				high = v
			}
		}
	}
	portsMu.Lock()
	defer portsMu.Unlock()
	r := rand.New(rand.NewSource(time.Now().UnixNano() ^ int64(os.Getpid())))
	for range 256 {
		base := low + r.Intn(high-low-2000-replicas)
		if overlaps(base) {
			continue
		}
		var held []net.Listener
		ok := true
		for i := range replicas {
			for _, off := range []int{0, 1000, 2000} {
				l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", base+off+i))
				if err != nil {
					ok = false
					break
				}
				held = append(held, l)
			}
		}
		for _, l := range held {
			l.Close()
		}
		if ok {
			handedOut[base] = true
			return base, nil
		}
	}
	return 0, errors.New("no free range of ports for a cluster on 127.0.0.1")
}

// overlaps says whether a layout at base shares a port with one handed out before (layouts
// are three blocks of `replicas` ports, 1000 apart, so they can interleave).
func overlaps(base int) bool {
	for b := range handedOut {
		for _, shift := range []int{-2000, -1000, 0, 1000, 2000} {
			if base < b+shift+replicas && b+shift < base+replicas {
				return true
			}
		}
	}
	return false
}
