package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/mitosis-fork/mitosis/directory"
	"github.com/mitosis-fork/mitosis/function"
	"github.com/mitosis-fork/mitosis/gateway"
	"github.com/mitosis-fork/mitosis/transport"
)

type gatewayFlags struct {
	listen        string
	stateDir      string
	etcd          []string
	etcdListen    string
	etcdPeer      string
	etcdPrefix    string
	name          string
	secretFile    string
	insecure      bool
	tlsCert       string
	tlsKey        string
	tlsCA         string
	user          string
	passwordFile  string
	tokenFile     string
	noAuth        bool
	public        bool
	maxBody       string
	maxQueue      int
	queueTimeout  time.Duration
	asyncDrain    time.Duration
	asyncMemory   bool
	defaultPolicy string
	wf            gateway.WorkflowConfig
}

func newGatewayCmd() *cobra.Command {
	f := &gatewayFlags{}
	cmd := &cobra.Command{
		Use:   "gateway",
		Short: "Run the serverless gateway (OpenFaaS REST API) in the foreground",
		Long: `Run the mitosis serverless gateway: the OpenFaaS REST API over the node
daemons registered in the cluster directory.

  GET/POST/PUT/DELETE /system/functions   list, deploy, update, delete
  GET  /system/function/NAME              one function's status
  POST /function/NAME                     invoke (the request body in, the handler's output out)
  POST /async-function/NAME               queue an invocation (202, X-Call-Id; X-Callback-Url gets the result)
  GET/POST/DELETE /system/workflows       list, deploy (a workflow definition), remove workflows
  POST /workflow/NAME[?transfer=storage]  run a workflow (the body is its input; the answer its run record)
  POST /async-workflow/NAME               run one in the background (202; X-Callback-Url gets the record)
  GET  /system/workflow-runs[/ID]         the cluster's runs (the latest 256), or one in full
  DELETE /system/workflow-runs/CALL_ID    cancel a run in the background, on any gateway
  GET  /healthz, /metrics, /system/info, /system/nodes

A function is a directory with handler.py (the OpenFaaS classic python3
template: module-level code initializes, handle(req) serves one request),
deployed with {"service": NAME, "image": "/abs/dir"}. The annotation
com.mitosis.policy picks how invocations get an instance: fork (default: one
seed for the cluster, every invocation a child forked on the least-loaded
node), local-fork (a seed per node), keep-alive (warm instances kept for
com.mitosis.keep-alive, default 10m) or cold (a process per request).

Without --etcd-endpoints the gateway runs an embedded etcd (data in
STATE_DIR/etcd, clients at --etcd-listen) for the daemons to register in:
start them with --etcd-endpoints pointing at it and the same --secret-file.

Authentication: HTTP basic auth (user --basic-auth-user, password from
--basic-auth-password-file, generated into STATE_DIR/basic-auth-password if
not given) or bearer tokens (--token-file, one a line). /healthz and /metrics
are open; --public-functions opens /function/ and /async-function/ too.`,
		Example: `  mitosis gateway --listen 127.0.0.1:8080 --secret-file /etc/mitosis/secret
  mitosis daemon --node a --listen 10.0.0.1:7070 --secret-file /etc/mitosis/secret \
      --etcd-endpoints http://127.0.0.1:2379
  curl -u admin:$(cat /var/lib/mitosis/gateway/basic-auth-password) \
      -d '{"service":"hello","image":"/srv/fn/hello"}' http://127.0.0.1:8080/system/functions
  curl -u admin:... -d 'world' http://127.0.0.1:8080/function/hello`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runGateway(f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.listen, "listen", envDefault("MITOSIS_GATEWAY_LISTEN", "127.0.0.1:8080"), "IP:PORT of the HTTP API")
	fl.StringVar(&f.stateDir, "state-dir", envDefault("MITOSIS_GATEWAY_STATE_DIR", "/var/lib/mitosis/gateway"), "the embedded etcd's data and the generated password")
	var envEtcd []string
	if v := os.Getenv("MITOSIS_ETCD_ENDPOINTS"); v != "" {
		envEtcd = strings.Split(v, ",")
	}
	fl.StringSliceVar(&f.etcd, "etcd-endpoints", envEtcd, "endpoints of an external etcd cluster (default: run an embedded one)")
	fl.StringVar(&f.etcdListen, "etcd-listen", "http://127.0.0.1:2379", "client URL of the embedded etcd (the daemons' --etcd-endpoints)")
	fl.StringVar(&f.etcdPeer, "etcd-peer-listen", "http://127.0.0.1:2380", "peer URL of the embedded etcd")
	fl.StringVar(&f.etcdPrefix, "etcd-prefix", "", "key prefix of the cluster directory (default /mitosis/)")
	host, _ := os.Hostname()
	fl.StringVar(&f.name, "name", "gateway-"+sanitizeName(host), "the gateway's name towards the nodes")
	fl.StringVar(&f.secretFile, "secret-file", os.Getenv("MITOSIS_SECRET_FILE"), "the cluster secret the nodes share (default $MITOSIS_SECRET_FILE)")
	fl.BoolVar(&f.insecure, "insecure", false, "talk to the nodes without a cluster secret")
	fl.StringVar(&f.tlsCert, "tls-cert", os.Getenv("MITOSIS_TLS_CERT"), "PEM certificate for TLS to the nodes (with --tls-key)")
	fl.StringVar(&f.tlsKey, "tls-key", os.Getenv("MITOSIS_TLS_KEY"), "PEM key of --tls-cert")
	fl.StringVar(&f.tlsCA, "tls-ca", os.Getenv("MITOSIS_TLS_CA"), "PEM CA of the nodes' certificates")
	fl.StringVar(&f.user, "basic-auth-user", "admin", "basic auth user")
	fl.StringVar(&f.passwordFile, "basic-auth-password-file", "", "file holding the basic auth password (default: generated into STATE_DIR/basic-auth-password)")
	fl.StringVar(&f.tokenFile, "token-file", "", "file of bearer tokens, one a line")
	fl.BoolVar(&f.noAuth, "no-auth", false, "serve without authentication (development only)")
	fl.BoolVar(&f.public, "public-functions", false, "leave /function/ and /async-function/ unauthenticated, as the OpenFaaS gateway does")
	fl.StringVar(&f.maxBody, "max-body", "4M", "largest request body (413 beyond)")
	fl.IntVar(&f.maxQueue, "max-queue", gateway.DefaultMaxQueue, "invocations that may wait for a free slot (429 beyond)")
	fl.DurationVar(&f.queueTimeout, "queue-timeout", gateway.DefaultQueueTimeout, "longest wait for a free slot (then 429)")
	fl.BoolVar(&f.asyncMemory, "async-memory-only", false, "keep accepted async invocations in this gateway's memory only, not filed in the cluster directory: a faster accept (no etcd write), but a gateway that dies loses what it had accepted")
	fl.DurationVar(&f.asyncDrain, "async-drain-timeout", gateway.DefaultAsyncDrain, "on SIGTERM, how long the async invocations already accepted may take to finish and post their callbacks before the rest are dropped (negative: drop at once)")
	fl.StringVar(&f.defaultPolicy, "default-policy", "fork", "policy of deployments that name none: fork, local-fork, keep-alive or cold")
	fl.StringVar(&f.wf.RedisSocket, "workflow-redis-socket", "", "unix socket of the Redis server for workflow runs under the storage transfer (every node must reach it)")
	fl.StringVar(&f.wf.WorkDir, "workflow-work-dir", "", "where a workflow's function directory (the step runtime) is written; every node must see it at the same path (default /tmp)")
	fl.DurationVar(&f.wf.StepTimeout, "workflow-step-timeout", 5*time.Minute, "bound on one step instance of a workflow run")
	fl.DurationVar(&f.wf.StageTTL, "workflow-stage-ttl", 2*time.Minute, "lease of a workflow run's stage seeds and Redis keys, renewed while it runs")
	fl.DurationVar(&f.wf.RunTTL, "workflow-run-ttl", 24*time.Hour, "how long the cluster directory keeps a workflow run's record (GET /system/workflow-runs on any gateway)")
	return cmd
}

func sanitizeName(s string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' {
			b.WriteRune(r)
		}
	}
	if b.Len() == 0 {
		return "host"
	}
	return b.String()
}

// auth builds the gateway's authentication from the flags.
func (f *gatewayFlags) auth() (gateway.Auth, error) {
	a := gateway.Auth{Disabled: f.noAuth, PublicFunctions: f.public}
	if f.noAuth {
		return a, nil
	}
	if f.tokenFile != "" {
		b, err := os.ReadFile(f.tokenFile)
		if err != nil {
			return a, fmt.Errorf("--token-file: %w", err)
		}
		for _, l := range strings.Split(string(b), "\n") {
			if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "#") {
				a.Tokens = append(a.Tokens, t)
			}
		}
		if len(a.Tokens) == 0 {
			return a, fmt.Errorf("--token-file %s holds no token", f.tokenFile)
		}
	}
	path := f.passwordFile
	if path == "" {
		path = filepath.Join(f.stateDir, "basic-auth-password")
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			var b [18]byte
			_, _ = rand.Read(b[:])
			if err := os.MkdirAll(f.stateDir, 0o700); err != nil {
				return a, err
			}
			if err := os.WriteFile(path, []byte(hex.EncodeToString(b[:])+"\n"), 0o600); err != nil {
				return a, fmt.Errorf("generate basic auth password: %w", err)
			}
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return a, fmt.Errorf("basic auth password: %w", err)
	}
	a.User, a.Password = f.user, strings.TrimSpace(string(b))
	if a.Password == "" {
		return a, fmt.Errorf("basic auth password file %s is empty", path)
	}
	return a, nil
}

func runGateway(f *gatewayFlags) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	maxBody, err := gateway.ParseMemory(f.maxBody)
	if err != nil {
		return fmt.Errorf("--max-body: %w", err)
	}
	pol, err := function.ParsePolicy(f.defaultPolicy)
	if err != nil {
		return fmt.Errorf("--default-policy: %w", err)
	}
	auth, err := f.auth()
	if err != nil {
		return err
	}
	tcfg := transport.Config{Node: f.name, Insecure: f.insecure, Conns: 8}
	if f.secretFile != "" {
		if tcfg.Secret, err = readSecret(f.secretFile); err != nil {
			return err
		}
	} else if !f.insecure {
		return errors.New("the gateway needs the nodes' cluster secret: give --secret-file FILE (or --insecure)")
	}
	if f.tlsCert != "" || f.tlsKey != "" || f.tlsCA != "" {
		if tcfg.TLS, err = loadTLS(f.tlsCert, f.tlsKey, f.tlsCA); err != nil {
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	endpoints := f.etcd
	var emb *directory.Embedded
	if len(endpoints) == 0 {
		emb, err = directory.StartEmbedded(ctx, directory.EmbedConfig{Dir: filepath.Join(f.stateDir, "etcd"),
			ClientURL: f.etcdListen, PeerURL: f.etcdPeer, Logger: log.With("component", "etcd")})
		if err != nil {
			return fmt.Errorf("embedded etcd: %w", err)
		}
		defer emb.Close()
		endpoints = emb.Endpoints()
		log.Info("embedded etcd", "endpoints", endpoints, "dir", filepath.Join(f.stateDir, "etcd"))
	}
	dir, err := directory.Open(ctx, endpoints, directory.Options{Prefix: f.etcdPrefix, Logger: log.With("component", "directory")})
	if err != nil {
		return err
	}
	defer dir.Close()
	g, err := gateway.New(ctx, gateway.Config{Directory: dir, Transport: tcfg, Auth: auth, MaxBody: maxBody,
		MaxQueue: f.maxQueue, QueueTimeout: f.queueTimeout, AsyncDrain: f.asyncDrain, AsyncMemoryOnly: f.asyncMemory, DefaultPolicy: pol, Logger: log, Workflows: f.wf, Name: f.listen})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", f.listen)
	if err != nil {
		_ = g.Close()
		return fmt.Errorf("--listen %s: %w", f.listen, err)
	}
	log.Info("gateway listening", "addr", ln.Addr().String(), "etcd", endpoints, "auth", !auth.Disabled, "public_functions", auth.PublicFunctions)
	served := make(chan error, 1)
	go func() { served <- g.Serve(ln) }()
	select {
	case err = <-served:
	case <-ctx.Done():
	}
	closeErr := g.Close()
	if err == nil {
		err = <-served
	}
	return errors.Join(err, closeErr)
}
