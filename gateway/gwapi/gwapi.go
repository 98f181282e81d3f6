// Package gwapi holds what a client of the gateway's HTTP API needs of its
// mitosis extensions (headers and request bodies), without the gateway
// itself: a workflow runner or any other client imports this, not package
// gateway and the node and engine behind it.
package gwapi

// Headers of stage seeds. A request with HeaderStage: true keeps its
// instance, once it answered 200, as a seed of the function (a stage seed),
// named NODE/SEED in the response's HeaderSeed; a request with HeaderSeed
// forks from that seed instead of the function's own. A workflow step's
// downstream steps inherit its memory this way. DELETE /system/stage-seeds
// removes one. HeaderStageTTL (a Go duration, e.g. "30m") on a stage
// request gives the stage seed a lease in the cluster directory: unless
// renewed (RenewStageSeedRequest, through any gateway) or removed before,
// it is removed when the lease runs out, so a client that dies leaves no
// seed (and no memory reservation) behind for good.
const (
	HeaderSeed     = "X-Mitosis-Seed"
	HeaderStage    = "X-Mitosis-Stage"
	HeaderStageTTL = "X-Mitosis-Stage-TTL"
)

// RenewStageSeedRequest is the body of PATCH /system/stage-seeds: the
// stage seed Seed of function FunctionName is removed TTL (a Go duration,
// e.g. "2m") from now unless renewed again or removed, as if it had been
// made with HeaderStageTTL: TTL. A client that holds stage seeds renews
// them while it needs them, so that they outlive it by at most TTL.
type RenewStageSeedRequest struct {
	FunctionName string `json:"functionName"`
	Seed         string `json:"seed"`
	TTL          string `json:"ttl"`
}

// DeleteStageSeedRequest is the body of DELETE /system/stage-seeds: the
// stage seed Seed ("NODE/SEED", from an invocation's X-Mitosis-Seed) of
// function FunctionName.
type DeleteStageSeedRequest struct {
	FunctionName string `json:"functionName"`
	Seed         string `json:"seed"`
}

// AnnotationTTL on a deployment (POST /system/functions) gives the function
// a time to live (a Go duration from 1s to 7 days, e.g. "2m"): its record
// in the cluster directory lives under a lease of that TTL, and unless
// renewed (RenewFunctionRequest, through any gateway) it is removed from
// every node when the lease runs out, as if deleted. For functions a
// client deploys for a while (a workflow run's own function), so that a
// client that dies leaves none behind for good. An update sets the TTL
// anew: a different one from now, the same one kept as it runs, none
// without the annotation.
const AnnotationTTL = "com.mitosis.ttl"

// RenewFunctionRequest is the body of PATCH /system/functions: function
// FunctionName, deployed with AnnotationTTL, lives for its TTL from now.
type RenewFunctionRequest struct {
	FunctionName string `json:"functionName"`
}
