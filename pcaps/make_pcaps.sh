#!/usr/bin/env bash
# make_pcaps.sh — make small sample captures of REAL Docker Registry (distribution v2) traffic.
#
# Run as root on Debian bookworm with these packages installed (this script installs nothing):
#   docker-registry skopeo curl tcpdump apache2-utils openssl iproute2  (tshark: optional, for the summary)
#
#   pcaps/make_pcaps.sh                 # make every capture
#   pcaps/make_pcaps.sh tls-registry    # make only the named ones (names as in the list below)
#   pcaps/make_pcaps.sh rule-pack       # make only the rule-pack captures (the second list below);
#                                       # `core` names the first six
#   KEEP_WORK=1 pcaps/make_pcaps.sh      # keep the temp dir: registry logs (one line per request),
#                                        # configs, and curl's TLS key log for tls-registry
#
# Every scenario starts its own registry (/usr/bin/docker-registry, distribution 2.8.2) with a
# minimal config, runs real clients (skopeo, curl) against it, and captures with tcpdump.
# Test traffic stays on loopback (127.0.0.1:5000) or inside two network namespaces this script
# creates (192.0.2.10 <-> 203.0.113.50); nothing else is contacted.
#
# Captures (written to the directory this script lives in):
#   anonymous-push-pull        no auth; skopeo pushes library/demo:1.0, then pulls it back
#   basic-auth-push            htpasswd auth; wrong password (skopeo + curl) -> 401, then alice pushes
#   anonymous-push-rejected    htpasswd auth; skopeo push without credentials -> 401; curl POST upload -> 401
#   catalog-tags-enumeration   no auth, 6 repos pushed before the capture; curl enumerates catalog + tags
#   external-client            registry 192.0.2.10 and client 203.0.113.50 in two netns over a veth pair
#   tls-registry               TLS registry (self-signed, registry.test); curl -k + skopeo inspect/pull
#
# Rule-pack captures (one or two rules each; see MANIFEST.md for what each rule must find):
#   bearer-token-push          token auth (JWT minted here, RS256 + x5c); skopeo push + curl pull with Bearer
#   auth-bruteforce            htpasswd auth; curl -u alice:<wrong-N> 20 times (12 on /v2/, 8 on a manifest)
#   credential-spraying        htpasswd auth; curl with 6 usernames and one password on /v2/
#   registry-delete            htpasswd auth; DELETE manifest + blobs on 127.0.0.1 (delete enabled: 202)
#                              and on 127.0.0.2 (delete disabled: 405)
#   blob-mount                 htpasswd auth; curl POST ?mount=&from= (201); skopeo pulls team/base, then
#                              pushes it as team/copy with a warm blob-info cache: it mounts the layer
#   scanner-user-agents        no auth; curl as zgrab and as python-requests on /v2/ and /v2/_catalog
#   bulk-pull                  no auth, 4 repos pushed before the capture; skopeo pulls all four
#
# The images pushed are built by hand as tiny OCI layouts (one gzip layer of a few hundred bytes).
# skopeo runs in a private mount namespace with an empty tmpfs over its blob-info cache, an empty
# auth/registries configuration and its own /etc/hosts, so every run sends the same requests and
# nothing is left behind on the host.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT_DIR=${OUT_DIR:-$HERE}
SAFE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH=$SAFE_PATH:$PATH
# Nothing here may go through a proxy, and the registry must not see any REGISTRY_* override.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY
unset REGISTRY_AUTH_FILE DOCKER_CONFIG CONTAINERS_REGISTRIES_CONF SSLKEYLOGFILE

CORE_SCENARIOS=(anonymous-push-pull basic-auth-push anonymous-push-rejected
                catalog-tags-enumeration external-client tls-registry)
RULE_PACK_SCENARIOS=(bearer-token-push auth-bruteforce credential-spraying registry-delete
                     blob-mount scanner-user-agents bulk-pull)
ALL_SCENARIOS=("${CORE_SCENARIOS[@]}" "${RULE_PACK_SCENARIOS[@]}")

PASSWORD='S3cret-Pa55word!'          # the known test password (tests check it never leaks)
WRONG_PASSWORD='wrong-password-1'
ENUM_UA='python-requests/2.31.0'
ZGRAB_UA='Mozilla/5.0 zgrab/0.x'
SPRAY_PASSWORD='Winter2026!'          # one password tried against many usernames
SPRAY_USERS=(admin root deploy ci backup registry)
TOKEN_SUB=deploy-bot                  # the JWT's sub claim (the token server's user name)
TOKEN_SERVICE=registry-sensor         # auth.token.service = the JWT's aud
TOKEN_ISSUER=registry-sensor-sample-token-issuer
REG2_IP=127.0.0.2                     # registry-delete: the second registry (deletes disabled)

NS_REG=rsensor-reg                    # network namespaces for external-client
NS_CLI=rsensor-cli
REG_IP=192.0.2.10                     # TEST-NET-1
CLI_IP=203.0.113.50                   # TEST-NET-3

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'make_pcaps: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- preflight
[[ $(id -u) -eq 0 ]] || die "run as root (tcpdump, network namespaces and mount namespaces need it)"

declare -A PKG_OF=([docker-registry]=docker-registry [skopeo]=skopeo [curl]=curl [tcpdump]=tcpdump
                   [htpasswd]=apache2-utils [openssl]=openssl [ip]=iproute2 [ss]=iproute2
                   [unshare]=util-linux [tar]=tar [gzip]=gzip [sha256sum]=coreutils)
missing=()
for cmd in docker-registry skopeo curl tcpdump htpasswd openssl ip ss unshare tar gzip sha256sum; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd (package ${PKG_OF[$cmd]})")
done
if ((${#missing[@]})); then
    printf 'make_pcaps: missing: %s\n' "${missing[@]}" >&2
    die "install the missing package(s) with apt-get first; this script does not install anything"
fi

SCENARIOS=()
for s in "$@"; do
    case $s in
        core) SCENARIOS+=("${CORE_SCENARIOS[@]}") ;;
        rule-pack) SCENARIOS+=("${RULE_PACK_SCENARIOS[@]}") ;;
        *) SCENARIOS+=("$s") ;;
    esac
done
((${#SCENARIOS[@]})) || SCENARIOS=("${ALL_SCENARIOS[@]}")
for s in "${SCENARIOS[@]}"; do
    [[ " ${ALL_SCENARIOS[*]} " == *" $s "* ]] || die "unknown scenario '$s' (known: ${ALL_SCENARIOS[*]}; groups: core, rule-pack)"
done

# ---------------------------------------------------------------- cleanup
WORK=$(mktemp -d /tmp/make-pcaps.XXXXXX)
REG_PID=
REG2_PID=
TCPDUMP_PID=

stop_tcpdump() {
    if [[ -n $TCPDUMP_PID ]]; then
        kill -INT "$TCPDUMP_PID" 2>/dev/null || true
        wait "$TCPDUMP_PID" 2>/dev/null || true
        TCPDUMP_PID=
    fi
}
stop_registry() {
    if [[ -n $REG_PID ]]; then
        kill -TERM "$REG_PID" 2>/dev/null || true
        wait "$REG_PID" 2>/dev/null || true
        REG_PID=
    fi
    if [[ -n $REG2_PID ]]; then
        kill -TERM "$REG2_PID" 2>/dev/null || true
        wait "$REG2_PID" 2>/dev/null || true
        REG2_PID=
    fi
}
delete_netns() {
    ip netns del "$NS_REG" 2>/dev/null || true
    ip netns del "$NS_CLI" 2>/dev/null || true
    ip link del rs-reg0 2>/dev/null || true   # only if a previous run died before moving it
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_tcpdump
    stop_registry
    delete_netns
    if [[ ${KEEP_WORK-} == 1 ]]; then echo "make_pcaps: work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
    if ((rc != 0)); then echo "make_pcaps: FAILED (exit $rc); captures already made are kept" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$WORK"/{home/.config,run,tmp,registries.d,cap,pull}
chmod 700 "$WORK/run"
echo '{"auths":{}}' > "$WORK/auth.json"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' > "$WORK/policy.json"
: > "$WORK/registries.conf"            # no mirrors, no blocks, no unqualified-search registries
printf '127.0.0.1 localhost\n127.0.0.1 registry.test\n::1 localhost\n' > "$WORK/hosts"

# ---------------------------------------------------------------- a tiny OCI image, built by hand
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# make_image DIR LABEL [TAG...]: an OCI image layout with one small gzip layer; ref names = tags
make_image() {
    local dir=$1 label=$2; shift 2
    local tags=("$@"); ((${#tags[@]})) || tags=(1.0)
    local root="$WORK/rootfs.$$" b="$dir/blobs/sha256"
    rm -rf "$dir" "$root"; mkdir -p "$b" "$root/app"
    printf 'hello from %s (registry-sensor sample image)\n' "$label" > "$root/hello.txt"
    printf '#!/bin/sh\ncat /hello.txt\n' > "$root/app/run.sh"; chmod 755 "$root/app/run.sh"
    # 6 KiB of incompressible but reproducible bytes (AES-CTR keystream keyed by the label), so a
    # blob upload/download is bigger than one 1500-byte frame: on loopback it travels in one big
    # frame, on the veth of external-client in several MTU-sized ones.
    head -c 6144 /dev/zero | openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:$label" > "$root/app/data.bin"
    tar --sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner \
        -C "$root" -cf "$WORK/layer.tar" app hello.txt
    gzip -9 -n -c "$WORK/layer.tar" > "$WORK/layer.tar.gz"
    local diff_id layer_d layer_s
    diff_id=$(sha "$WORK/layer.tar"); layer_d=$(sha "$WORK/layer.tar.gz"); layer_s=$(size "$WORK/layer.tar.gz")
    mv "$WORK/layer.tar.gz" "$b/$layer_d"
    printf '{"architecture":"amd64","os":"linux","created":"2023-11-14T22:13:20Z","config":{"Cmd":["/app/run.sh"],"Labels":{"sample":"%s"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"2023-11-14T22:13:20Z","created_by":"make_pcaps.sh"}]}' \
        "$label" "$diff_id" > "$WORK/config.json"
    local cfg_d cfg_s
    cfg_d=$(sha "$WORK/config.json"); cfg_s=$(size "$WORK/config.json")
    mv "$WORK/config.json" "$b/$cfg_d"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
        "$cfg_d" "$cfg_s" "$layer_d" "$layer_s" > "$WORK/manifest.json"
    local man_d man_s
    man_d=$(sha "$WORK/manifest.json"); man_s=$(size "$WORK/manifest.json")
    mv "$WORK/manifest.json" "$b/$man_d"
    local entries=() t
    for t in "${tags[@]}"; do
        entries+=("$(printf '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}' "$man_d" "$man_s" "$t")")
    done
    local IFS=,
    printf '{"schemaVersion":2,"manifests":[%s]}' "${entries[*]}" > "$dir/index.json"
    printf '{"imageLayoutVersion":"1.0.0"}' > "$dir/oci-layout"
    rm -rf "$root" "$WORK/layer.tar"
}

# image_digest DIR manifest|config|layer: a digest (sha256:...) of an image made by make_image
image_digest() {
    local dir=$1 what=$2 man
    man=$(grep -o '"digest":"sha256:[0-9a-f]*"' "$dir/index.json" | head -n1 | cut -d'"' -f4)
    case $what in
        manifest) echo "$man" ;;
        config) grep -o '"digest":"sha256:[0-9a-f]*"' "$dir/blobs/sha256/${man#sha256:}" | sed -n 1p | cut -d'"' -f4 ;;
        layer) grep -o '"digest":"sha256:[0-9a-f]*"' "$dir/blobs/sha256/${man#sha256:}" | sed -n 2p | cut -d'"' -f4 ;;
        *) die "image_digest: what is '$what'?" ;;
    esac
}

# ---------------------------------------------------------------- bearer tokens, minted here
# There is no token server package in Debian, so the script is the token server: an RSA key with a
# self-signed certificate (the registry's auth.token.rootcertbundle) signs JWTs the way
# distribution 2.8's registry/auth/token/token.go verifies them.
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }

make_token_signer() {
    mkdir -p "$WORK/token"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$TOKEN_ISSUER" \
        -keyout "$WORK/token/signer.key" -out "$WORK/token/signer.crt" 2>/dev/null
}

# mint_token SUB REPO ACTIONS: a compact JWT; ACTIONS is a JSON list body, e.g. '"pull","push"'.
#   header: alg RS256, x5c = [the signer certificate] (the registry checks it chains to the
#           rootcertbundle and verifies the signature with its public key; no kid needed)
#   claims: iss = auth.token.issuer, aud = auth.token.service (a string in 2.8), sub, nbf <= now
#           <= exp (15 minutes), iat, jti, access = [{type: repository, name: REPO, actions}]
mint_token() {
    local sub=$1 repo=$2 actions=$3 now x5c jti header claims signing_input
    now=$(date +%s)
    x5c=$(openssl x509 -in "$WORK/token/signer.crt" -outform DER | openssl base64 -A)
    jti=$(openssl rand -hex 16)
    header=$(printf '{"typ":"JWT","alg":"RS256","x5c":["%s"]}' "$x5c" | b64url)
    claims=$(printf '{"iss":"%s","sub":"%s","aud":"%s","exp":%d,"nbf":%d,"iat":%d,"jti":"%s","access":[{"type":"repository","name":"%s","actions":[%s]}]}' \
        "$TOKEN_ISSUER" "$sub" "$TOKEN_SERVICE" $((now + 900)) $((now - 60)) "$now" "$jti" \
        "$repo" "$actions" | b64url)
    signing_input="$header.$claims"
    printf '%s.%s' "$signing_input" \
        "$(printf '%s' "$signing_input" | openssl dgst -sha256 -binary -sign "$WORK/token/signer.key" | b64url)"
}

# ---------------------------------------------------------------- clients
# in_ns NS CMD...: run CMD in network namespace NS, or here when NS is empty
in_ns() {
    local ns=$1; shift
    if [[ -n $ns ]]; then ip netns exec "$ns" "$@"; else "$@"; fi
}

# run_skopeo [--netns NS] ARGS...: skopeo with a clean, private view of its configuration:
#  - empty tmpfs over its blob-info cache (/var/lib/containers, or /var/lib when that is absent),
#    so it never tries cross-repository mounts learned in an earlier run and writes nothing;
#  - no credentials except those on its command line; no registries.conf mirrors;
#  - our /etc/hosts (registry.test -> 127.0.0.1), so the TLS scenario can use a name (SNI).
run_skopeo() {
    local ns=
    if [[ ${1-} == --netns ]]; then ns=$2; shift 2; fi
    in_ns "$ns" env -i PATH="$SAFE_PATH" HOME="$WORK/home" XDG_RUNTIME_DIR="$WORK/run" \
        XDG_CONFIG_HOME="$WORK/home/.config" TMPDIR="$WORK/tmp" \
        CONTAINERS_REGISTRIES_CONF="$WORK/registries.conf" REGISTRY_AUTH_FILE="$WORK/auth.json" \
        unshare --mount --propagation private -- /bin/sh -c '
            set -e
            hosts=$1; shift
            if [ -d /var/lib/containers ]; then mount -t tmpfs -o size=16m skopeo-cache /var/lib/containers
            else mount -t tmpfs -o size=16m skopeo-cache /var/lib; fi
            mount --bind "$hosts" /etc/hosts
            exec skopeo "$@"' sh "$WORK/hosts" \
        --policy "$WORK/policy.json" --registries.d "$WORK/registries.d" "$@"
}

# run_skopeo_pair ARGS... --then ARGS...: two skopeo commands, one after the other, in ONE private
# mount namespace as run_skopeo sets it up: they share one (empty at the start) blob-info cache, so
# the second knows where the first saw each blob -- as on a host where skopeo or podman ran before.
# That is what makes containers/image mount a blob from another repository instead of uploading it.
run_skopeo_pair() {
    local first=(--policy "$WORK/policy.json" --registries.d "$WORK/registries.d")
    while (($#)) && [[ $1 != --then ]]; do first+=("$1"); shift; done
    (($#)) || die "run_skopeo_pair: no --then"
    shift
    env -i PATH="$SAFE_PATH" HOME="$WORK/home" XDG_RUNTIME_DIR="$WORK/run" \
        XDG_CONFIG_HOME="$WORK/home/.config" TMPDIR="$WORK/tmp" \
        CONTAINERS_REGISTRIES_CONF="$WORK/registries.conf" REGISTRY_AUTH_FILE="$WORK/auth.json" \
        unshare --mount --propagation private -- /bin/bash -c '
            set -e
            hosts=$1 n=$2; shift 2
            if [ -d /var/lib/containers ]; then mount -t tmpfs -o size=16m skopeo-cache /var/lib/containers
            else mount -t tmpfs -o size=16m skopeo-cache /var/lib; fi
            mount --bind "$hosts" /etc/hosts
            skopeo "${@:1:n}"
            exec skopeo "${@:n+1}"' bash "$WORK/hosts" "${#first[@]}" "${first[@]}" \
        --policy "$WORK/policy.json" --registries.d "$WORK/registries.d" "$@"
}

# ccurl ARGS...: curl that never uses a proxy or a .curlrc
ccurl() { curl -q --noproxy '*' -sS "$@"; }

# ---------------------------------------------------------------- registry
# write_config FILE ADDR [auth] [tls] [token] [delete] [store=SUFFIX]
#   auth: htpasswd; token: auth.token with the signer of mint_token; delete: storage.delete.enabled;
#   store=SUFFIX: storage in $WORK/storage.$SCENARIO.SUFFIX (a second registry of the same scenario)
write_config() {
    local file=$1 addr=$2; shift 2
    local auth=0 tls=0 token=0 delete=0 store="$WORK/storage.$SCENARIO" opt
    for opt in "$@"; do
        case $opt in
            auth) auth=1 ;; tls) tls=1 ;; token) token=1 ;; delete) delete=1 ;;
            store=*) store="$WORK/storage.$SCENARIO.${opt#store=}" ;;
        esac
    done
    mkdir -p "$store"
    {
        echo "version: 0.1"
        echo "log:"
        echo "  level: info"
        echo "  formatter: text"
        echo "storage:"
        echo "  filesystem:"
        echo "    rootdirectory: $store"
        if ((delete)); then
            echo "  delete:"
            echo "    enabled: true"
        fi
        echo "http:"
        echo "  addr: $addr"
        echo "  secret: registry-sensor-sample-secret"
        if ((tls)); then
            echo "  tls:"
            echo "    certificate: $WORK/tls/registry.test.crt"
            echo "    key: $WORK/tls/registry.test.key"
        fi
        if ((auth)); then
            echo "auth:"
            echo "  htpasswd:"
            echo "    realm: registry-sensor"
            echo "    path: $WORK/htpasswd"
        fi
        if ((token)); then
            # realm: where clients would get tokens; nothing listens there (tokens are minted
            # by mint_token and handed to the clients directly)
            echo "auth:"
            echo "  token:"
            echo "    realm: http://127.0.0.1:5001/token"
            echo "    service: $TOKEN_SERVICE"
            echo "    issuer: $TOKEN_ISSUER"
            echo "    rootcertbundle: $WORK/token/signer.crt"
        fi
    } > "$file"
}

port_free_check() {   # NS
    if in_ns "$1" ss -Hltn 'sport = :5000' | grep -q .; then
        die "something already listens on TCP 5000${1:+ in netns $1}; stop it first"
    fi
}

# start_registry NS CONFIG URL [curl-args...]: start it with no REGISTRY_* in its environment, wait
start_registry() {
    local ns=$1 config=$2 url=$3; shift 3
    port_free_check "$ns"
    if [[ -n $ns ]]; then
        ip netns exec "$ns" env -i PATH="$SAFE_PATH" docker-registry serve "$config" \
            > "$WORK/registry.$SCENARIO.log" 2>&1 &
    else
        env -i PATH="$SAFE_PATH" docker-registry serve "$config" > "$WORK/registry.$SCENARIO.log" 2>&1 &
    fi
    REG_PID=$!
    local i code
    for i in $(seq 1 100); do
        kill -0 "$REG_PID" 2>/dev/null || { cat "$WORK/registry.$SCENARIO.log" >&2; die "registry exited"; }
        code=$(ccurl -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url" 2>/dev/null || true)
        if [[ $code == 200 || $code == 401 ]]; then return 0; fi
        sleep 0.1
    done
    cat "$WORK/registry.$SCENARIO.log" >&2
    die "registry did not answer on $url"
}

# start_second_registry CONFIG URL: one more registry here, on another address (REG2_PID); the
# port check of start_registry already made sure nothing else listens on TCP 5000
start_second_registry() {
    local config=$1 url=$2 rlog="$WORK/registry.$SCENARIO.2.log"
    env -i PATH="$SAFE_PATH" docker-registry serve "$config" > "$rlog" 2>&1 &
    REG2_PID=$!
    local i code
    for i in $(seq 1 100); do
        kill -0 "$REG2_PID" 2>/dev/null || { cat "$rlog" >&2; die "second registry exited"; }
        code=$(ccurl -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null || true)
        if [[ $code == 200 || $code == 401 ]]; then return 0; fi
        sleep 0.1
    done
    cat "$rlog" >&2
    die "second registry did not answer on $url"
}

# ---------------------------------------------------------------- capture
# start_capture NS IFACE: tcpdump 'tcp port 5000' into $WORK/cap/$SCENARIO.pcap, wait until live
start_capture() {
    local ns=$1 iface=$2 file="$WORK/cap/$SCENARIO.pcap" err="$WORK/tcpdump.$SCENARIO.log"
    rm -f "$file"
    if [[ -n $ns ]]; then
        ip netns exec "$ns" tcpdump -i "$iface" -w "$file" -U -Z root 'tcp port 5000' 2> "$err" &
    else
        tcpdump -i "$iface" -w "$file" -U -Z root 'tcp port 5000' 2> "$err" &
    fi
    TCPDUMP_PID=$!
    local i
    for i in $(seq 1 100); do
        kill -0 "$TCPDUMP_PID" 2>/dev/null || { cat "$err" >&2; die "tcpdump exited"; }
        if grep -q 'listening on' "$err" 2>/dev/null && [[ -s $file ]]; then sleep 0.5; return 0; fi
        sleep 0.1
    done
    cat "$err" >&2
    die "tcpdump did not start"
}

# finish_capture: let the last FIN/ACKs arrive, stop tcpdump (SIGINT flushes), install the file
finish_capture() {
    sleep 1
    stop_tcpdump
    grep -E 'packets (captured|received by filter|dropped by kernel)' "$WORK/tcpdump.$SCENARIO.log" \
        | sed "s/^/    tcpdump: /" >&2 || true
    install -m 0644 "$WORK/cap/$SCENARIO.pcap" "$OUT_DIR/$SCENARIO.pcap"
    MADE+=("$OUT_DIR/$SCENARIO.pcap")
}

# expect_code WANT CURL-ARGS...: one curl request; its status code must be WANT
expect_code() {
    local want=$1 code; shift
    code=$(ccurl -o /dev/null -w '%{http_code}' "$@")
    [[ $code == "$want" ]] || die "expected $want, got $code: curl $(printf '%q ' "$@" | cut -c1-200)"
}

expect_fail() {   # CMD...: the command must fail (a refused push); its error goes to the log
    if "$@" >> "$WORK/expected-failures.log" 2>&1; then die "expected this to be refused: $*"; fi
    log "    refused as expected: $(tail -n1 "$WORK/expected-failures.log" | cut -c1-160)"
}

LOCAL=http://127.0.0.1:5000
DEST=127.0.0.1:5000
MADE=()

# ---------------------------------------------------------------- scenarios
scenario_anonymous_push_pull() {
    write_config "$WORK/config.yml" 127.0.0.1:5000
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    make_image "$WORK/img-demo" library/demo 1.0
    start_capture "" lo
    log "    skopeo push oci:img-demo:1.0 -> $DEST/library/demo:1.0 (anonymous)"
    run_skopeo copy --dest-tls-verify=false --dest-no-creds \
        "oci:$WORK/img-demo:1.0" "docker://$DEST/library/demo:1.0"
    log "    skopeo pull $DEST/library/demo:1.0 -> dir: (anonymous)"
    run_skopeo copy --src-tls-verify=false --src-no-creds \
        "docker://$DEST/library/demo:1.0" "dir:$WORK/pull/demo"
    finish_capture
    stop_registry
}

make_htpasswd() {
    htpasswd -Bbn alice "$PASSWORD" > "$WORK/htpasswd"
}

scenario_basic_auth_push() {
    make_htpasswd
    write_config "$WORK/config.yml" 127.0.0.1:5000 auth
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    make_image "$WORK/img-private" library/private 1.0
    start_capture "" lo
    log "    skopeo push with alice's WRONG password (expect 401)"
    expect_fail run_skopeo copy --dest-tls-verify=false --dest-creds "alice:$WRONG_PASSWORD" \
        "oci:$WORK/img-private:1.0" "docker://$DEST/library/private:1.0"
    log "    curl -u alice:<wrong> GET /v2/ (expect 401)"
    code=$(ccurl -o /dev/null -w '%{http_code}' -u "alice:$WRONG_PASSWORD" "$LOCAL/v2/")
    [[ $code == 401 ]] || die "wrong password: expected 401, got $code"
    log "    skopeo push as alice with the right password"
    run_skopeo copy --dest-tls-verify=false --dest-creds "alice:$PASSWORD" \
        "oci:$WORK/img-private:1.0" "docker://$DEST/library/private:1.0"
    finish_capture
    stop_registry
}

scenario_anonymous_push_rejected() {
    make_htpasswd
    write_config "$WORK/config.yml" 127.0.0.1:5000 auth
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    make_image "$WORK/img-evil" library/evil 1.0
    start_capture "" lo
    log "    skopeo push without credentials (expect 401)"
    expect_fail run_skopeo copy --dest-tls-verify=false --dest-no-creds \
        "oci:$WORK/img-evil:1.0" "docker://$DEST/library/evil:1.0"
    log "    curl POST /v2/library/evil/blobs/uploads/ without credentials (expect 401)"
    code=$(ccurl -o /dev/null -w '%{http_code}' -X POST -H 'Content-Length: 0' \
        "$LOCAL/v2/library/evil/blobs/uploads/")
    [[ $code == 401 ]] || die "anonymous POST upload: expected 401, got $code"
    finish_capture
    stop_registry
}

scenario_catalog_tags_enumeration() {
    write_config "$WORK/config.yml" 127.0.0.1:5000
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    local i repos=()
    log "    (not captured) pushing team/app-1..6"
    for i in 1 2 3 4 5 6; do
        if ((i == 1)); then make_image "$WORK/img-app" "team/app-$i" 1.0 1.1 latest
        else make_image "$WORK/img-app" "team/app-$i" 1.0; fi
        local t
        for t in $(grep -o '"org.opencontainers.image.ref.name":"[^"]*"' "$WORK/img-app/index.json" | cut -d'"' -f4); do
            run_skopeo copy -q --dest-tls-verify=false --dest-no-creds \
                "oci:$WORK/img-app:$t" "docker://$DEST/team/app-$i:$t" >/dev/null
        done
        repos+=("team/app-$i")
    done
    start_capture "" lo
    local ua=(-A "$ENUM_UA")
    log "    curl (one connection, keep-alive): GET /v2/  GET /v2/_catalog"
    ccurl "${ua[@]}" -o /dev/null -o /dev/null "$LOCAL/v2/" "$LOCAL/v2/_catalog"
    log "    curl: GET /v2/_catalog?n=2 and every Link: rel=\"next\" page"
    local next="/v2/_catalog?n=2" pages=0 link
    while [[ -n $next ]] && ((pages < 10)); do
        ccurl "${ua[@]}" -o /dev/null -D "$WORK/headers" "$LOCAL$next"
        pages=$((pages + 1))
        link=$(grep -i '^link:' "$WORK/headers" | sed -E 's/^[^<]*<([^>]*)>.*/\1/' | tr -d '\r' || true)
        log "      $next -> next: ${link:-none}"
        next=$link
    done
    log "    curl (one connection, keep-alive): GET /v2/<name>/tags/list for ${#repos[@]} repositories"
    local urls=() outs=() r
    for r in "${repos[@]}"; do urls+=("$LOCAL/v2/$r/tags/list"); outs+=(-o /dev/null); done
    ccurl "${ua[@]}" "${outs[@]}" "${urls[@]}"
    finish_capture
    stop_registry
}

scenario_external_client() {
    delete_netns
    ip netns add "$NS_REG"
    ip netns add "$NS_CLI"
    ip link add rs-reg0 type veth peer name rs-cli0
    ip link set rs-reg0 netns "$NS_REG"
    ip link set rs-cli0 netns "$NS_CLI"
    local ns dev me peer
    for ns in "$NS_REG" "$NS_CLI"; do
        if [[ $ns == "$NS_REG" ]]; then dev=rs-reg0 me=$REG_IP peer=$CLI_IP; else dev=rs-cli0 me=$CLI_IP peer=$REG_IP; fi
        ip -n "$ns" link set lo up
        # keep frames <= MTU on the wire we capture: no ethtool here, so cap GSO at one segment
        ip -n "$ns" link set "$dev" gso_max_segs 1 2>/dev/null || log "    (could not set gso_max_segs on $dev)"
        if command -v ethtool >/dev/null 2>&1; then
            ip netns exec "$ns" ethtool -K "$dev" tso off gso off gro off >/dev/null 2>&1 || true
        fi
        ip -n "$ns" addr add "$me/32" dev "$dev"
        ip -n "$ns" link set "$dev" up
        ip -n "$ns" route add "$peer/32" dev "$dev"
    done
    write_config "$WORK/config.yml" "$REG_IP:5000"
    # readiness is polled from the client namespace, before the capture starts
    REG_URL="http://$REG_IP:5000"
    start_registry_ext
    make_image "$WORK/img-ext" library/demo 1.0
    start_capture "$NS_REG" rs-reg0
    log "    [$CLI_IP] skopeo push -> $REG_IP:5000/library/demo:1.0"
    run_skopeo --netns "$NS_CLI" copy --dest-tls-verify=false --dest-no-creds \
        "oci:$WORK/img-ext:1.0" "docker://$REG_IP:5000/library/demo:1.0"
    log "    [$CLI_IP] curl GET /v2/  GET /v2/_catalog"
    ip netns exec "$NS_CLI" curl -q --noproxy '*' -sS -o /dev/null -o /dev/null \
        "$REG_URL/v2/" "$REG_URL/v2/_catalog"
    log "    [$CLI_IP] skopeo pull $REG_IP:5000/library/demo:1.0"
    run_skopeo --netns "$NS_CLI" copy --src-tls-verify=false --src-no-creds \
        "docker://$REG_IP:5000/library/demo:1.0" "dir:$WORK/pull/ext"
    finish_capture
    stop_registry
    delete_netns
}

start_registry_ext() {
    port_free_check "$NS_REG"
    ip netns exec "$NS_REG" env -i PATH="$SAFE_PATH" docker-registry serve "$WORK/config.yml" \
        > "$WORK/registry.$SCENARIO.log" 2>&1 &
    REG_PID=$!
    local i code
    for i in $(seq 1 100); do
        kill -0 "$REG_PID" 2>/dev/null || { cat "$WORK/registry.$SCENARIO.log" >&2; die "registry exited"; }
        code=$(ip netns exec "$NS_CLI" curl -q --noproxy '*' -s -o /dev/null -w '%{http_code}' \
            --max-time 2 "$REG_URL/v2/" 2>/dev/null || true)
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    cat "$WORK/registry.$SCENARIO.log" >&2
    die "registry in $NS_REG did not answer on $REG_URL from $NS_CLI"
}

scenario_tls_registry() {
    mkdir -p "$WORK/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj /CN=registry.test -addext subjectAltName=DNS:registry.test \
        -keyout "$WORK/tls/registry.test.key" -out "$WORK/tls/registry.test.crt" 2>/dev/null
    write_config "$WORK/config.yml" 127.0.0.1:5000 tls
    local url=https://registry.test:5000 resolve=(--resolve registry.test:5000:127.0.0.1)
    start_registry "" "$WORK/config.yml" "$url/v2/" -k "${resolve[@]}"
    make_image "$WORK/img-tls" library/demo 1.0
    log "    (not captured) skopeo push registry.test:5000/library/demo:1.0"
    run_skopeo copy -q --dest-tls-verify=false --dest-no-creds \
        "oci:$WORK/img-tls:1.0" "docker://registry.test:5000/library/demo:1.0" >/dev/null
    start_capture "" lo
    log "    curl -k --resolve registry.test:5000:127.0.0.1 $url/v2/"
    SSLKEYLOGFILE="$WORK/tls/curl-keys.log" ccurl -k "${resolve[@]}" -o /dev/null "$url/v2/"
    log "    skopeo inspect + pull docker://registry.test:5000/library/demo:1.0 (tls-verify=false)"
    run_skopeo inspect --tls-verify=false --no-creds "docker://registry.test:5000/library/demo:1.0" >/dev/null
    run_skopeo copy --src-tls-verify=false --src-no-creds \
        "docker://registry.test:5000/library/demo:1.0" "dir:$WORK/pull/tls"
    finish_capture
    stop_registry
}

# ---------------------------------------------------------------- rule-pack scenarios
# push_quietly DIR TAG DEST/REPO [skopeo dest-auth args...]: a push made before the capture starts
push_quietly() {
    local dir=$1 tag=$2 target=$3; shift 3
    (($#)) || set -- --dest-no-creds
    run_skopeo copy -q --dest-tls-verify=false "$@" "oci:$dir:$tag" "docker://$target:$tag" >/dev/null
}

scenario_bearer_token_push() {
    make_token_signer
    write_config "$WORK/config.yml" 127.0.0.1:5000 token
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    local token
    token=$(mint_token "$TOKEN_SUB" library/tokendemo '"pull","push"')
    make_image "$WORK/img-token" library/tokendemo 1.0
    start_capture "" lo
    log "    skopeo push library/tokendemo:1.0 with --dest-registry-token <JWT, sub $TOKEN_SUB>"
    run_skopeo copy --dest-tls-verify=false --dest-registry-token "$token" \
        "oci:$WORK/img-token:1.0" "docker://$DEST/library/tokendemo:1.0"
    log "    curl -H 'Authorization: Bearer <JWT>' (one connection): GET /v2/, GET manifest 1.0 (expect 200 200)"
    local codes
    codes=$(ccurl -H "Authorization: Bearer $token" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' -o /dev/null -o /dev/null \
        -w '%{http_code} ' "$LOCAL/v2/" "$LOCAL/v2/library/tokendemo/manifests/1.0")
    [[ $codes == "200 200 " ]] || die "bearer token: expected 200 200, got $codes"
    finish_capture
    stop_registry
}

scenario_auth_bruteforce() {
    make_htpasswd
    write_config "$WORK/config.yml" 127.0.0.1:5000 auth
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    start_capture "" lo
    local i
    log "    curl -u alice:wrong-N GET /v2/ for N = 1..12 (expect 401 each, one connection each)"
    for i in $(seq 1 12); do expect_code 401 -u "alice:wrong-$i" "$LOCAL/v2/"; done
    log "    curl -u alice:wrong-N GET /v2/library/private/manifests/1.0 for N = 13..20 (expect 401 each)"
    for i in $(seq 13 20); do
        expect_code 401 -u "alice:wrong-$i" "$LOCAL/v2/library/private/manifests/1.0"
    done
    finish_capture
    stop_registry
}

scenario_credential_spraying() {
    make_htpasswd
    write_config "$WORK/config.yml" 127.0.0.1:5000 auth
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    start_capture "" lo
    local u
    log "    curl -u <user>:<one password> GET /v2/ for ${SPRAY_USERS[*]} (expect 401 each)"
    for u in "${SPRAY_USERS[@]}"; do expect_code 401 -u "$u:$SPRAY_PASSWORD" "$LOCAL/v2/"; done
    finish_capture
    stop_registry
}

scenario_registry_delete() {
    make_htpasswd
    local reg2=http://$REG2_IP:5000
    write_config "$WORK/config.yml" 127.0.0.1:5000 auth delete
    write_config "$WORK/config2.yml" "$REG2_IP:5000" auth store=2
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    start_second_registry "$WORK/config2.yml" "$reg2/v2/"
    make_image "$WORK/img-del" library/demo 1.0
    log "    (not captured) skopeo push library/demo:1.0 as alice to $DEST and $REG2_IP:5000"
    push_quietly "$WORK/img-del" 1.0 "$DEST/library/demo" --dest-creds "alice:$PASSWORD"
    push_quietly "$WORK/img-del" 1.0 "$REG2_IP:5000/library/demo" --dest-creds "alice:$PASSWORD"
    local man cfg layer u=(-u "alice:$PASSWORD") oci=(-H 'Accept: application/vnd.oci.image.manifest.v1+json')
    man=$(image_digest "$WORK/img-del" manifest)
    cfg=$(image_digest "$WORK/img-del" config)
    layer=$(image_digest "$WORK/img-del" layer)
    start_capture "" lo
    log "    [$DEST, delete enabled] curl -u alice: HEAD manifest 1.0 (200), DELETE manifest by digest (202),"
    log "      DELETE layer blob (202), DELETE config blob (202), HEAD manifest 1.0 (404)"
    expect_code 200 "${u[@]}" "${oci[@]}" -I "$LOCAL/v2/library/demo/manifests/1.0"
    expect_code 202 "${u[@]}" -X DELETE "$LOCAL/v2/library/demo/manifests/$man"
    expect_code 202 "${u[@]}" -X DELETE "$LOCAL/v2/library/demo/blobs/$layer"
    expect_code 202 "${u[@]}" -X DELETE "$LOCAL/v2/library/demo/blobs/$cfg"
    expect_code 404 "${u[@]}" "${oci[@]}" -I "$LOCAL/v2/library/demo/manifests/1.0"
    log "    [$REG2_IP:5000, delete disabled] curl -u alice: DELETE manifest (405), DELETE layer blob (405),"
    log "      HEAD manifest 1.0 (200)"
    expect_code 405 "${u[@]}" -X DELETE "$reg2/v2/library/demo/manifests/$man"
    expect_code 405 "${u[@]}" -X DELETE "$reg2/v2/library/demo/blobs/$layer"
    expect_code 200 "${u[@]}" "${oci[@]}" -I "$reg2/v2/library/demo/manifests/1.0"
    finish_capture
    stop_registry
}

scenario_blob_mount() {
    make_htpasswd
    write_config "$WORK/config.yml" 127.0.0.1:5000 auth
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    make_image "$WORK/img-base" team/base 1.0
    log "    (not captured) skopeo push team/base:1.0 as alice"
    push_quietly "$WORK/img-base" 1.0 "$DEST/team/base" --dest-creds "alice:$PASSWORD"
    local layer
    layer=$(image_digest "$WORK/img-base" layer)
    start_capture "" lo
    log "    curl -u alice POST /v2/team/app/blobs/uploads/?mount=<layer>&from=team/base (expect 201)"
    expect_code 201 -u "alice:$PASSWORD" -X POST -H 'Content-Length: 0' \
        "$LOCAL/v2/team/app/blobs/uploads/?mount=$layer&from=team/base"
    log "    skopeo pull team/base:1.0 -> dir:, then (same blob-info cache) push dir: -> team/copy:1.0, as alice"
    run_skopeo_pair copy --src-tls-verify=false --src-creds "alice:$PASSWORD" \
            "docker://$DEST/team/base:1.0" "dir:$WORK/pull/base" \
        --then copy --dest-tls-verify=false --dest-creds "alice:$PASSWORD" \
            "dir:$WORK/pull/base" "docker://$DEST/team/copy:1.0"
    finish_capture
    stop_registry
}

scenario_scanner_user_agents() {
    write_config "$WORK/config.yml" 127.0.0.1:5000
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    make_image "$WORK/img-scan" library/demo 1.0
    log "    (not captured) skopeo push library/demo:1.0"
    push_quietly "$WORK/img-scan" 1.0 "$DEST/library/demo"
    start_capture "" lo
    log "    curl -A '$ZGRAB_UA' (one connection): GET /v2/, GET /v2/_catalog"
    ccurl -A "$ZGRAB_UA" -o /dev/null -o /dev/null "$LOCAL/v2/" "$LOCAL/v2/_catalog"
    log "    curl -A '$ENUM_UA' (one connection): GET /v2/, GET /v2/_catalog"
    ccurl -A "$ENUM_UA" -o /dev/null -o /dev/null "$LOCAL/v2/" "$LOCAL/v2/_catalog"
    log "    curl -A '$ENUM_UA' GET /v2/_catalog?n=100000 (above the maximum of 1000: expect 400)"
    expect_code 400 -A "$ENUM_UA" "$LOCAL/v2/_catalog?n=100000"
    finish_capture
    stop_registry
}

scenario_bulk_pull() {
    write_config "$WORK/config.yml" 127.0.0.1:5000
    start_registry "" "$WORK/config.yml" "$LOCAL/v2/"
    local i
    log "    (not captured) skopeo push team/svc-1..4:1.0"
    for i in 1 2 3 4; do
        make_image "$WORK/img-svc-$i" "team/svc-$i" 1.0
        push_quietly "$WORK/img-svc-$i" 1.0 "$DEST/team/svc-$i"
    done
    start_capture "" lo
    for i in 1 2 3 4; do
        log "    skopeo pull $DEST/team/svc-$i:1.0 -> dir: (anonymous)"
        run_skopeo copy --src-tls-verify=false --src-no-creds \
            "docker://$DEST/team/svc-$i:1.0" "dir:$WORK/pull/svc-$i"
    done
    finish_capture
    stop_registry
}

# ---------------------------------------------------------------- summary (needs tshark)
summarize() {
    local f=$1 decode=(-d tcp.port==5000,http)
    [[ $(basename "$f") == tls-registry.pcap ]] && decode=(-d tcp.port==5000,tls)
    echo "--- $(basename "$f")  ($(size "$f") bytes, $(tshark -r "$f" 2>/dev/null | wc -l) frames," \
         "largest frame $(tshark -r "$f" -T fields -e frame.len 2>/dev/null | sort -n | tail -n1) bytes)"
    echo "  requests (client, method):"
    tshark -r "$f" "${decode[@]}" -Y http.request -T fields -e ip.src -e http.request.method 2>/dev/null \
        | sort | uniq -c | sed 's/^/    /'
    echo "  responses (status):"
    tshark -r "$f" "${decode[@]}" -Y http.response -T fields -e http.response.code 2>/dev/null \
        | sort | uniq -c | sed 's/^/    /'
    if [[ $(basename "$f") == tls-registry.pcap ]]; then
        echo "  TLS ClientHello SNI:"
        tshark -r "$f" "${decode[@]}" -Y 'tls.handshake.type==1' -T fields \
            -e tls.handshake.extensions_server_name 2>/dev/null | sort | uniq -c | sed 's/^/    /'
    fi
}

# ---------------------------------------------------------------- main
for SCENARIO in "${SCENARIOS[@]}"; do
    log "$SCENARIO"
    "scenario_${SCENARIO//-/_}"
done

echo "made:"
for f in "${MADE[@]}"; do printf '  %s (%s bytes)\n' "$f" "$(size "$f")"; done
if command -v tshark >/dev/null 2>&1; then
    for f in "${MADE[@]}"; do summarize "$f"; done
fi
