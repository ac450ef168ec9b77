// etcd-bench: a closed-loop load generator for etcd with the semantics and output of
// `kmmr-replica bench`, so that the two systems can be compared side by side.
//
// Each of --clients clients has its own etcd client (its own gRPC connection) and keeps
// --window requests in flight; every request is a Put of a --request-size-byte value (0 by
// default: an empty value) to a key of its own client. Requests that start after --warmup
// seconds and finish within the following --duration seconds are measured; throughput is
// their count divided by --duration. --gap adds think time after each reply (every request of
// a lone client with --gap 20ms then starts on an idle cluster).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// result mirrors kmmr-replica's BenchResult field for field.
type result struct {
	Clients     int     `json:"clients"`
	Window      int     `json:"window"`
	RequestSize int     `json:"request_size"`
	Ops         int     `json:"ops"`
	Seconds     float64 `json:"seconds"`
	OpsPerSec   float64 `json:"ops_per_sec"`
	P50us       uint64  `json:"p50_us"`
	P90us       uint64  `json:"p90_us"`
	P99us       uint64  `json:"p99_us"`
	MaxUs       uint64  `json:"max_us"`
	Errors      int     `json:"errors"`
}

type sample struct {
	lat    []uint64
	errors int
}

func main() {
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "comma-separated client URLs (host:port or http://host:port); each client uses all of them, as etcd's client balances")
	clients := flag.Int("clients", 1, "concurrent clients, each with its own connection")
	window := flag.Int("window", 1, "requests each client keeps in flight")
	duration := flag.Float64("duration", 10, "measured seconds (after the warm-up)")
	warmup := flag.Float64("warmup", 2, "warm-up seconds")
	requestSize := flag.Int("request-size", 0, "bytes of each Put's value")
	timeout := flag.Duration("request-timeout", 10*time.Second, "give up on a request after this long (counted as an error)")
	prefix := flag.String("key-prefix", "bench/", "keys are <prefix>c<client number>")
	asJSON := flag.Bool("json", false, "print one machine-readable JSON line instead of text")
	gap := flag.Duration("gap", 0, "think time after each reply before the next request (for example 20ms: every request then starts on an idle cluster, as the apiserver benchmark's watched writes do)")
	flag.Parse()
	if flag.NArg() != 0 {
		fail(fmt.Errorf("unexpected arguments: %v", flag.Args()))
	}
	if *clients < 1 || *duration <= 0 || *warmup < 0 || *requestSize < 0 || *gap < 0 {
		fail(errors.New("--clients must be >= 1, --duration > 0, --warmup, --request-size and --gap >= 0"))
	}
	if *window < 1 {
		*window = 1
	}
	var eps []string
	for _, e := range strings.Split(*endpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			eps = append(eps, e)
		}
	}
	if len(eps) == 0 {
		fail(errors.New("--endpoints is empty"))
	}

	r, err := measure(eps, *clients, *window, *duration, *warmup, *requestSize, *timeout, *prefix, *gap)
	if err != nil {
		fail(err)
	}
	if *asJSON {
		b, err := json.Marshal(r)
		if err != nil {
			fail(err)
		}
		fmt.Println(string(b))
	} else {
		fmt.Printf("%d clients x %d in flight, %d-byte requests: %.0f ops/s over %.1f s; latency p50 %d us, p90 %d us, p99 %d us, max %d us; %d errors\n",
			r.Clients, r.Window, r.RequestSize, r.OpsPerSec, r.Seconds, r.P50us, r.P90us, r.P99us, r.MaxUs, r.Errors)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "etcd-bench: %v\n", err)
	os.Exit(1)
}

func measure(eps []string, nClients, window int, duration, warmup float64, size int, timeout time.Duration, prefix string, gap time.Duration) (*result, error) {
	conns := make([]*clientv3.Client, 0, nClients)
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	for i := 0; i < nClients; i++ {
		c, err := clientv3.New(clientv3.Config{
			Endpoints:   eps,
			DialTimeout: 10 * time.Second,
			Logger:      zap.NewNop(),
		})
		if err != nil {
			return nil, fmt.Errorf("client %d: connecting to %v: %w", i, eps, err)
		}
		conns = append(conns, c)
	}
	// Every connection must work before the clock starts: one write each.
	value := string(make([]byte, size))
	for i, c := range conns {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := c.Put(ctx, fmt.Sprintf("%sc%d", prefix, i), value)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("client %d: first Put: %w", i, err)
		}
	}

	start := time.Now()
	measureFrom := start.Add(time.Duration(warmup * float64(time.Second)))
	end := measureFrom.Add(time.Duration(duration * float64(time.Second)))
	samples := make([]sample, nClients*window)
	var wg sync.WaitGroup
	for i, c := range conns {
		key := fmt.Sprintf("%sc%d", prefix, i)
		for w := 0; w < window; w++ {
			wg.Add(1)
			go func(c *clientv3.Client, s *sample) {
				defer wg.Done()
				for time.Now().Before(end) {
					t0 := time.Now()
					ctx, cancel := context.WithTimeout(context.Background(), timeout)
					_, err := c.Put(ctx, key, value)
					cancel()
					t1 := time.Now()
					if !t0.Before(measureFrom) && !t1.After(end) {
						if err == nil {
							s.lat = append(s.lat, uint64(t1.Sub(t0).Microseconds()))
						} else {
							s.errors++
						}
					}
					if gap > 0 {
						time.Sleep(gap)
					}
				}
			}(c, &samples[i*window+w])
		}
	}
	wg.Wait()

	var all []uint64
	errs := 0
	for _, s := range samples {
		all = append(all, s.lat...)
		errs += s.errors
	}
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	pct := func(p float64) uint64 {
		if len(all) == 0 {
			return 0
		}
		i := int(float64(len(all)) * p)
		if i > len(all)-1 {
			i = len(all) - 1
		}
		return all[i]
	}
	r := &result{
		Clients:     nClients,
		Window:      window,
		RequestSize: size,
		Ops:         len(all),
		Seconds:     duration,
		OpsPerSec:   float64(len(all)) / duration,
		P50us:       pct(0.5),
		P90us:       pct(0.9),
		P99us:       pct(0.99),
		Errors:      errs,
	}
	if len(all) > 0 {
		r.MaxUs = all[len(all)-1]
	}
	return r, nil
}
