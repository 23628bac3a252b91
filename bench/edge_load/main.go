// Command edge_load is the load generator of the vehicle edge benchmark: it
// simulates many vehicles, each with its own client certificate and one
// persistent WebSocket connection to the ingest gateway, speaks wire protocol
// v1 (ack / retry + resume / refused) and prints one JSON object of results.
//
//	cd bench/edge_load && go build -o /tmp/edge_load . && /tmp/edge_load -h
//
// All vehicles connect first; then each connection sends its vehicle's
// uploads in file order, cycling, with at most -window unanswered. Without
// -rate it sends as soon as the window allows (closed loop); with -rate each
// connection follows its own Poisson schedule (open loop) and an upload that
// the window or a retry holds back keeps its scheduled time. Latency runs from
// that intended send time (closed loop: the actual send) to the ack frame, and
// for a retried upload it includes the retry and the wait before the resend.
// The run lasts -warmup + -duration seconds, then up to -drain seconds for the
// answers to what is still in flight.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

type record struct {
	id      string
	payload []byte
}

type vehicle struct {
	vin     string
	cert    tls.Certificate
	records []record
}

type config struct {
	rate               float64 // uploads/s per connection; 0 = closed loop
	window             int
	start, measureFrom time.Time
	stop, drainUntil   time.Time
}

func main() {
	url := flag.String("url", "wss://127.0.0.1:8443/v1/uploads", "gateway upload endpoint")
	certDir := flag.String("certs", "", "folder of <VIN>.pem / <VIN>.key vehicle certificates (one connection each)")
	caFile := flag.String("ca", "", "edge CA (PEM) that issued the gateway's certificate")
	payloadDir := flag.String("payloads", "", "folder of <VIN>.bin upload files (u16 BE id length | id | u32 BE payload length | payload)")
	nVehicles := flag.Int("vehicles", 0, "use only the first N vehicles (sorted by VIN); 0 = all cert pairs found")
	rate := flag.Float64("rate", 0, "total uploads/s offered, shared by the connected vehicles, Poisson per connection; 0 = as fast as acknowledged")
	window := flag.Int("window", 8, "max uploads in flight per connection")
	duration := flag.Float64("duration", 30, "measured seconds (after the warm-up)")
	warmup := flag.Float64("warmup", 5, "seconds of load before the measured period, excluded from rates and latencies")
	drain := flag.Float64("drain", 10, "seconds to wait for answers to in-flight uploads at the end")
	dialers := flag.Int("connect-parallel", 64, "concurrent TLS/WebSocket handshakes while connecting")
	flag.Parse()
	if *certDir == "" || *caFile == "" || *payloadDir == "" || *window < 1 || *rate < 0 {
		flag.Usage()
		os.Exit(2)
	}

	vehicles, err := loadVehicles(*certDir, *payloadDir, *nVehicles)
	if err != nil {
		fatal(err)
	}
	caPEM, err := os.ReadFile(*caFile)
	if err != nil {
		fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		fatal(fmt.Errorf("%s: no PEM certificate", *caFile))
	}

	// Connect everyone first, then start the clock for all at once.
	conns := make([]*websocket.Conn, len(vehicles))
	var connectErr sync.Map // first error text -> struct{}, for the report
	var wg sync.WaitGroup
	sem := make(chan struct{}, *dialers)
	connectStart := time.Now()
	for i, v := range vehicles {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			d := websocket.Dialer{
				TLSClientConfig:  &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{v.cert}, MinVersion: tls.VersionTLS12},
				HandshakeTimeout: 15 * time.Second,
			}
			c, resp, err := d.Dial(*url, http.Header{})
			if err != nil {
				if resp != nil {
					err = fmt.Errorf("%w (HTTP %s)", err, resp.Status)
				}
				connectErr.LoadOrStore(err.Error(), struct{}{})
				return
			}
			conns[i] = c
		}()
	}
	wg.Wait()
	connectSeconds := time.Since(connectStart).Seconds()

	st := newStats()
	now := time.Now()
	cfg := config{window: *window, start: now}
	cfg.measureFrom = now.Add(seconds(*warmup))
	cfg.stop = cfg.measureFrom.Add(seconds(*duration))
	cfg.drainUntil = cfg.stop.Add(seconds(*drain))
	connected := 0
	for _, c := range conns {
		if c != nil {
			connected++
		}
	}
	if connected > 0 {
		cfg.rate = *rate / float64(connected)
	}
	for i, c := range conns {
		if c != nil {
			wg.Add(1)
			go func() { defer wg.Done(); runVehicle(c, vehicles[i], &cfg, st) }()
		}
	}
	// CPU of the measured period: sample getrusage at its two ends.
	time.Sleep(time.Until(cfg.measureFrom))
	cpuAtMeasure := cpuSeconds()
	time.Sleep(time.Until(cfg.stop))
	cpuAtStop := cpuSeconds()
	wg.Wait()

	r := report{
		Vehicles: len(vehicles), Connected: connected, ConnectFailures: len(vehicles) - connected,
		ConnectErrors: []string{}, ConnectS: round(connectSeconds, 3),
		RateOffered: *rate, Window: *window, WarmupS: *warmup, DurationS: *duration,
		Sent: st.sent, Resent: st.resent, Acked: st.acked, Retried: st.retried, Refused: st.refused,
		Unanswered: st.unanswered, Unexpected: st.unexpected, ScheduledNotSent: st.behind, Disconnected: st.disconnected,
		AckedMeasured: st.measuredAcked, AcksPerS: round(float64(st.measuredAcked)/(*duration), 1),
		P50: st.hist.quantileMs(0.50), P90: st.hist.quantileMs(0.90), P99: st.hist.quantileMs(0.99),
		P999: st.hist.quantileMs(0.999), Max: round(float64(st.hist.max.Load())/1000, 3),
		CPUS: round(cpuSeconds(), 3), CPUSMeasured: round(cpuAtStop-cpuAtMeasure, 3),
		CPUCoresMeasured: round((cpuAtStop-cpuAtMeasure)/(*duration), 3),
	}
	connectErr.Range(func(k, _ any) bool {
		r.ConnectErrors = append(r.ConnectErrors, k.(string))
		return len(r.ConnectErrors) < 5
	})
	if st.measuredAcked > 0 {
		us := round((cpuAtStop-cpuAtMeasure)*1e6/float64(st.measuredAcked), 2)
		r.CPUUsPerAck = &us
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	_ = enc.Encode(r)
}

// report is the one JSON object printed on stdout. Counts cover the whole run
// (warm-up, measured period and drain); *_measured, acks_per_s, the latency
// quantiles and cpu_*_measured cover the measured period only.
type report struct {
	Vehicles         int            `json:"vehicles"`
	Connected        int            `json:"connected"`
	ConnectFailures  int            `json:"connect_failures"`
	ConnectErrors    []string       `json:"connect_errors"` // up to 5 distinct messages
	ConnectS         float64        `json:"connect_s"`
	RateOffered      float64        `json:"rate_offered"`
	Window           int            `json:"window"`
	WarmupS          float64        `json:"warmup_s"`
	DurationS        float64        `json:"duration_s"`
	Sent             int            `json:"sent"`   // binary frames, resends included
	Resent           int            `json:"resent"` // after a retry
	Acked            int            `json:"acked"`
	Retried          map[string]int `json:"retried"`    // by reason, one per upload id
	Refused          map[string]int `json:"refused"`    // by reason
	Unanswered       int            `json:"unanswered"` // in flight when the drain ended or the connection broke
	Unexpected       int            `json:"unexpected_answers"`
	ScheduledNotSent int            `json:"scheduled_not_sent"` // -rate only: due before the end, held back by window/retries
	Disconnected     map[string]int `json:"disconnected"`       // connections the gateway closed early, by close code
	AckedMeasured    int            `json:"acked_measured"`
	AcksPerS         float64        `json:"acks_per_s"`
	P50              float64        `json:"p50_ms"`
	P90              float64        `json:"p90_ms"`
	P99              float64        `json:"p99_ms"`
	P999             float64        `json:"p999_ms"`
	Max              float64        `json:"max_ms"`
	CPUS             float64        `json:"cpu_s"` // the generator's own user+system CPU (getrusage)
	CPUSMeasured     float64        `json:"cpu_s_measured"`
	CPUCoresMeasured float64        `json:"cpu_cores_measured"`
	CPUUsPerAck      *float64       `json:"cpu_us_per_ack"`
}

// loadVehicles pairs <VIN>.pem with <VIN>.key in certDir (sorted by VIN, the
// first n if n > 0) and reads each vehicle's <VIN>.bin from payloadDir.
func loadVehicles(certDir, payloadDir string, n int) ([]vehicle, error) {
	pems, err := filepath.Glob(filepath.Join(certDir, "*.pem"))
	if err != nil {
		return nil, err
	}
	sort.Strings(pems)
	var vs []vehicle
	for _, p := range pems {
		if n > 0 && len(vs) == n {
			break
		}
		key := strings.TrimSuffix(p, ".pem") + ".key"
		if _, err := os.Stat(key); err != nil {
			continue // a .pem without a key (a CA, say) is not a vehicle
		}
		cert, err := tls.LoadX509KeyPair(p, key)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		vin := strings.TrimSuffix(filepath.Base(p), ".pem")
		recs, err := readPayloads(filepath.Join(payloadDir, vin+".bin"))
		if err != nil {
			return nil, err
		}
		vs = append(vs, vehicle{vin: vin, cert: cert, records: recs})
	}
	if len(vs) == 0 {
		return nil, fmt.Errorf("%s: no <VIN>.pem/<VIN>.key pairs", certDir)
	}
	if n > len(vs) {
		return nil, fmt.Errorf("-vehicles %d but only %d cert pairs in %s", n, len(vs), certDir)
	}
	return vs, nil
}

// readPayloads parses records of u16 BE id length | id | u32 BE payload length | payload.
func readPayloads(path string) ([]record, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var recs []record
	for len(b) > 0 {
		if len(b) < 2 {
			return nil, fmt.Errorf("%s: truncated record", path)
		}
		n := int(binary.BigEndian.Uint16(b))
		if len(b) < 2+n+4 {
			return nil, fmt.Errorf("%s: truncated record", path)
		}
		id := string(b[2 : 2+n])
		b = b[2+n:]
		m := int(binary.BigEndian.Uint32(b))
		if len(b) < 4+m {
			return nil, fmt.Errorf("%s: truncated record", path)
		}
		recs = append(recs, record{id: id, payload: b[4 : 4+m : 4+m]})
		b = b[4+m:]
	}
	if len(recs) == 0 {
		return nil, fmt.Errorf("%s: no records", path)
	}
	return recs, nil
}

// answer is one gateway text frame.
type answer struct {
	Ack          []string `json:"ack"`
	Retry        []string `json:"retry"`
	Refused      *string  `json:"refused"`
	Reason       string   `json:"reason"`
	RetryAfterMs int64    `json:"retry_after_ms"`
}

type event struct {
	a   answer
	at  time.Time
	err error // the connection broke
	bad bool  // not a JSON text frame
}

// runVehicle drives one connection. Uploads are numbered by seq (record =
// seq mod len(records)); everything except the reads happens in this
// goroutine, so the connection has a single writer.
func runVehicle(c *websocket.Conn, v vehicle, cfg *config, st *stats) {
	defer c.Close()
	events := make(chan event, cfg.window+16) // one answer per upload: never more than window unread
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			typ, msg, err := c.ReadMessage()
			ev := event{at: time.Now(), err: err}
			if err == nil {
				ev.bad = typ != websocket.TextMessage || json.Unmarshal(msg, &ev.a) != nil
			}
			select {
			case events <- ev:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()

	var (
		l          = local{retried: map[string]int{}, refused: map[string]int{}, disconnected: map[string]int{}}
		nextSeq    uint64                   // next never-sent upload
		startedAt  = map[uint64]time.Time{} // unacknowledged seq -> intended send time
		inflight   = map[string][]uint64{}  // upload id -> seqs in flight, oldest first
		nInflight  int
		resend     []uint64 // retried seqs, ascending: sent before any new upload
		paused     bool     // a retry arrived; waiting for in-flight answers, then retryAfter
		retryAfter time.Duration
		resumeAt   time.Time // set once paused and nothing is in flight
		nextSched  = cfg.start
		stopping   bool
		timer      = time.NewTimer(time.Hour)
	)
	defer func() { st.merge(&l) }()
	expo := func() time.Duration { return time.Duration(rand.ExpFloat64() / cfg.rate * 1e9) }
	if cfg.rate > 0 {
		nextSched = cfg.start.Add(expo()) // random phase per connection
	}
	rec := func(seq uint64) record { return v.records[seq%uint64(len(v.records))] }
	broke := func(err error) { l.unanswered += nInflight; l.disconnect(err) }
	// A write fails when the gateway has closed: prefer the reader's error, which has the close code.
	writeFailed := func(err error) {
		timeout := time.After(time.Second)
		for {
			select {
			case ev := <-events:
				if ev.err == nil {
					continue
				}
				err = ev.err
			case <-timeout:
			}
			broke(err)
			return
		}
	}
	take := func(id string) (uint64, bool) {
		q := inflight[id]
		if len(q) == 0 {
			l.unexpected++
			return 0, false
		}
		if len(q) == 1 {
			delete(inflight, id)
		} else {
			inflight[id] = q[1:]
		}
		nInflight--
		return q[0], true
	}

	for {
		now := time.Now()
		if !stopping && !now.Before(cfg.stop) {
			stopping = true
			if cfg.rate > 0 { // open loop: what the schedule wanted but the window/retries held back
				for ; nextSched.Before(cfg.stop); nextSched = nextSched.Add(expo()) {
					l.behind++
				}
			}
		}
		if stopping && nInflight == 0 || now.After(cfg.drainUntil) {
			l.unanswered += nInflight
			_ = c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), now.Add(time.Second))
			return
		}
		if paused && nInflight == 0 && !stopping {
			if resumeAt.IsZero() {
				resumeAt = now.Add(retryAfter)
			}
			if !now.Before(resumeAt) {
				if err := c.WriteMessage(websocket.TextMessage, []byte(`{"resume": true}`)); err != nil {
					writeFailed(err)
					return
				}
				paused, retryAfter, resumeAt = false, 0, time.Time{}
			}
		}

		// Send while the window, the retry state and (with -rate) the schedule allow.
		for !stopping && !paused && nInflight < cfg.window {
			var seq uint64
			if len(resend) > 0 {
				seq, resend = resend[0], resend[1:]
				l.resent++
			} else if cfg.rate == 0 {
				seq = nextSeq
				nextSeq++
				startedAt[seq] = now
			} else if !nextSched.After(now) {
				seq = nextSeq
				nextSeq++
				startedAt[seq] = nextSched // latency from the scheduled time: no coordinated omission
				nextSched = nextSched.Add(expo())
			} else {
				break
			}
			r := rec(seq)
			if err := c.WriteMessage(websocket.BinaryMessage, r.payload); err != nil {
				writeFailed(err)
				return
			}
			l.sent++
			inflight[r.id] = append(inflight[r.id], seq)
			nInflight++
			now = time.Now()
		}

		// Sleep until the next thing to do: an answer, the schedule, the resume or the end.
		wake := cfg.drainUntil
		if !stopping {
			wake = cfg.stop
			if paused && !resumeAt.IsZero() && resumeAt.Before(wake) {
				wake = resumeAt
			}
			if !paused && cfg.rate > 0 && nInflight < cfg.window && nextSched.Before(wake) {
				wake = nextSched
			}
		}
		timer.Reset(time.Until(wake))
		var ev event
		select {
		case ev = <-events:
		case <-timer.C:
			continue
		}
		if ev.err != nil {
			broke(ev.err)
			return
		}
		if ev.bad {
			l.unexpected++
			continue
		}
		a := ev.a // each key on its own, should a frame ever carry more than one
		if a.Ack == nil && a.Retry == nil && a.Refused == nil {
			l.unexpected++
		}
		if a.Ack != nil {
			for _, id := range a.Ack {
				if seq, ok := take(id); ok {
					l.acked++
					if !ev.at.Before(cfg.measureFrom) && !ev.at.After(cfg.stop) {
						l.measuredAcked++
						st.hist.record(ev.at.Sub(startedAt[seq]))
					}
					delete(startedAt, seq)
				}
			}
		}
		if a.Retry != nil {
			for _, id := range a.Retry {
				if seq, ok := take(id); ok {
					l.retried[a.Reason]++
					i := sort.Search(len(resend), func(i int) bool { return resend[i] >= seq })
					resend = append(resend[:i], append([]uint64{seq}, resend[i:]...)...)
				}
			}
			paused = true
			retryAfter = max(retryAfter, time.Duration(a.RetryAfterMs)*time.Millisecond)
		}
		if a.Refused != nil {
			id := *a.Refused
			if id == "" { // the gateway could not read an id: charge the oldest in flight
				oldest := ^uint64(0)
				for k, q := range inflight {
					if q[0] < oldest {
						oldest, id = q[0], k
					}
				}
			}
			if seq, ok := take(id); ok {
				l.refused[a.Reason]++
				delete(startedAt, seq)
			}
		}
	}
}

// local holds one connection's counters, merged into stats when it ends.
type local struct {
	sent, resent, acked, measuredAcked, unexpected, unanswered, behind int
	retried, refused, disconnected                                     map[string]int
}

func (l *local) disconnect(err error) {
	var ce *websocket.CloseError
	if errors.As(err, &ce) {
		l.disconnected[strconv.Itoa(ce.Code)]++
	} else {
		l.disconnected["error"]++
	}
}

// stats is the run's total: the connections' counters and one shared latency histogram.
type stats struct {
	mu sync.Mutex
	local
	hist histogram
}

func newStats() *stats {
	return &stats{local: local{retried: map[string]int{}, refused: map[string]int{}, disconnected: map[string]int{}}}
}

func (s *stats) merge(l *local) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sent += l.sent
	s.resent += l.resent
	s.acked += l.acked
	s.measuredAcked += l.measuredAcked
	s.unexpected += l.unexpected
	s.unanswered += l.unanswered
	s.behind += l.behind
	for k, n := range l.retried {
		s.retried[k] += n
	}
	for k, n := range l.refused {
		s.refused[k] += n
	}
	for k, n := range l.disconnected {
		s.disconnected[k] += n
	}
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func round(x float64, digits int) float64 {
	f, _ := strconv.ParseFloat(strconv.FormatFloat(x, 'f', digits, 64), 64)
	return f
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "edge_load:", err)
	os.Exit(1)
}
