#!/bin/bash
# shellcheck disable=SC2154
# (devstack defines the variables this file reads, e.g. DEST, NOVA_CPU_CONF)
#
# devstack plugin for nova-thunder.
#
#   enable_plugin nova-thunder file:///opt/stack/nova-thunder
#
# stack install      installs the project
# stack post-config  on the node running RabbitMQ: creates the thunder
#                    vhost and one RabbitMQ user per agent host, per
#                    nova-compute host and for the coordinators
#                    (doc/operators.rst "RabbitMQ users"); on every node:
#                    writes thunder-agent.conf, thunder-coordinator.conf and
#                    [thunder] of nova-cpu.conf, each with its own user
# stack extra        starts thunder-coordinator and thunder-agent, restarts
#                    n-cpu as nova-compute-thunder, creates the volume type
# unstack            stops the agent and the coordinator
# clean              also removes the volume type, the agent's state and the
#                    [thunder] options

NOVA_THUNDER_NOVA_OPTS=(enabled backend volume_types image_origin
                        agent_host agent_state_path agent_run_path
                        transport_url control_exchange)

# The agents' and coordinators' [DEFAULT] control_exchange and topics (the
# defaults of [agent] topic and [coordinator] topic); the RabbitMQ
# permissions below are written for these names.
THUNDER_CONTROL_EXCHANGE=openstack
THUNDER_AGENT_TOPIC=thunder-agent
THUNDER_COORDINATOR_TOPIC=thunder-coordinator

function nova_thunder_bin_dir {
    get_python_exec_prefix
}

function install_nova_thunder {
    setup_develop "$NOVA_THUNDER_DIR"
}

# -- RabbitMQ users --------------------------------------------------------

# The literal $1 as a regular expression (RabbitMQ's are Erlang's).
function _thunder_rabbit_re {
    printf '%s' "$1" | sed -e 's/[][\\.^$*+?(){}|]/\\&/g'
}

function _thunder_rabbit_check_host {
    if [[ ! "$1" =~ ^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$ ]]; then
        die $LINENO "nova-thunder: '$1' is not a host name (THUNDER_HOST, THUNDER_RABBIT_HOSTS)"
    fi
}

function _thunder_rabbit_check_secret {
    if [[ "$THUNDER_RABBIT_USERS" == "True" && \
            -z "${THUNDER_RABBIT_SECRET:-$RABBIT_PASSWORD}" ]]; then
        die $LINENO "nova-thunder: set THUNDER_RABBIT_SECRET or RABBIT_PASSWORD"
    fi
}

# The password of RabbitMQ user $1: HMAC-SHA256 of the name under
# THUNDER_RABBIT_SECRET (default: RABBIT_PASSWORD), so that every node of a
# multi-node devstack computes the same without a shared file. The secret
# goes through the environment, never on a command line.
function nova_thunder_rabbit_password {
    THUNDER_RABBIT_KEY=${THUNDER_RABBIT_SECRET:-$RABBIT_PASSWORD} python3 -c '
import hashlib, hmac, os, sys
print(hmac.new(os.environ["THUNDER_RABBIT_KEY"].encode(),
               sys.argv[1].encode(), hashlib.sha256).hexdigest())' "$1"
}

# The transport_url of RabbitMQ user $1: devstack's broker address, the
# user's password, the thunder vhost. With THUNDER_RABBIT_USERS=False,
# devstack's own (stackrabbit on /).
function nova_thunder_transport_url {
    local url
    url=$(get_transport_url)
    if [[ "$THUNDER_RABBIT_USERS" != "True" ]]; then
        echo "$url"
        return
    fi
    local hostport=${url#*://}
    hostport=${hostport#*@}
    hostport=${hostport%%/*}
    echo "rabbit://$1:$(nova_thunder_rabbit_password "$1")@$hostport/$THUNDER_RABBIT_VHOST"
}

# Whether the first column of a line of rabbitmqctl's listing $1 is $2 (no
# pipe: a reader that stops early would fail the listing under pipefail).
function _thunder_rabbit_listed {
    local name _
    while IFS=$'\t' read -r name _; do
        [[ "$name" == "$2" ]] && return 0
    done <<< "$1"
    return 1
}

# Create user $1 (or reset its password) with permissions configure $2,
# write $3, read $4 on the thunder vhost and topic permissions write $5,
# read $6 on the control exchange. The password goes on rabbitmqctl's
# standard input, not its command line.
function _thunder_rabbit_user {
    local user=$1 vhost=$THUNDER_RABBIT_VHOST
    local password
    password=$(nova_thunder_rabbit_password "$user")
    local users
    users=$(sudo rabbitmqctl -q list_users)
    if _thunder_rabbit_listed "$users" "$user"; then
        printf '%s\n' "$password" | sudo rabbitmqctl change_password "$user"
    else
        printf '%s\n' "$password" | sudo rabbitmqctl add_user "$user"
    fi
    sudo rabbitmqctl set_permissions -p "$vhost" "$user" "$2" "$3" "$4"
    sudo rabbitmqctl set_topic_permissions -p "$vhost" "$user" \
        "$THUNDER_CONTROL_EXCHANGE" "$5" "$6"
}

# The vhost, the coordinators' user and, for every host of
# THUNDER_RABBIT_HOSTS, its agent's and its nova-compute's users. The
# queue and exchange names are oslo.messaging's (rabbit driver): an RPC
# server on topic T as host H consumes the queues T, T.H and
# T_fanout_<uuid hex>, bound to the topic exchange (control_exchange) and
# to the fanout exchange T_fanout; a caller consumes its reply queue
# reply_<uuid hex>; answers are published to the default exchange
# (amq.default). doc/operators.rst "RabbitMQ users" says what this
# enforces and what it does not.
function create_nova_thunder_rabbit_users {
    _thunder_rabbit_check_secret
    local vhost=$THUNDER_RABBIT_VHOST vhosts
    vhosts=$(sudo rabbitmqctl -q list_vhosts)
    if ! _thunder_rabbit_listed "$vhosts" "$vhost"; then
        sudo rabbitmqctl add_vhost "$vhost"
    fi
    local e a c u='[0-9a-f]{32}'
    e=$(_thunder_rabbit_re "$THUNDER_CONTROL_EXCHANGE")
    a=$(_thunder_rabbit_re "$THUNDER_AGENT_TOPIC")
    c=$(_thunder_rabbit_re "$THUNDER_COORDINATOR_TOPIC")
    # The coordinators cast tree_changed to agents (topic $a.<host>).
    _thunder_rabbit_user thunder-coordinator \
        "^($e|$c|$c\\..+|${c}_fanout|${c}_fanout_$u)\$" \
        "^($e|amq\\.default|$c|$c\\..+|${c}_fanout_$u)\$" \
        "^($e|$c|$c\\..+|${c}_fanout|${c}_fanout_$u)\$" \
        "^$a\\..+\$" "^$c(\\..+)?\$"
    local host h
    for host in ${THUNDER_RABBIT_HOSTS//,/ }; do
        _thunder_rabbit_check_host "$host"
        h=$(_thunder_rabbit_re "$host")
        _thunder_rabbit_user "thunder-agent.$host" \
            "^($e|$a|$a\\.$h|${a}_fanout|${a}_fanout_$u|reply_$u)\$" \
            "^($e|amq\\.default|$a|$a\\.$h|${a}_fanout_$u)\$" \
            "^($e|$a|$a\\.$h|${a}_fanout|${a}_fanout_$u|reply_$u)\$" \
            "^($c|$a\\.$h)\$" "^$a(\\.$h)?\$"
        _thunder_rabbit_user "thunder-nova.$host" \
            "^($e|reply_$u)\$" "^$e\$" "^reply_$u\$" \
            "^$a\\.$h\$" '^$'
    done
}

# -- certificates -------------------------------------------------------------

function _thunder_check_ip {
    if ! python3 -c 'import ipaddress, sys; ipaddress.ip_address(sys.argv[1])' \
            "$1" 2>/dev/null; then
        die $LINENO "nova-thunder: '$1' is not an IP address (THUNDER_HOST_IP)"
    fi
}

# A P-256 key and a certificate signed by the CA in THUNDER_CA_DIR (made
# when missing), for THUNDER_HOST at THUNDER_HOST_IP, in THUNDER_PKI_DIR in
# the layout QEMU and libnbd read ([tls] certificates_dir). openssl takes
# the subject and extensions as arguments: no template file, no secret on a
# command line (keys are written by openssl itself, 0600 under umask 077).
function _thunder_openssl {
    sudo bash -c 'umask 077; exec "$@"' openssl openssl "$@"
}

function create_nova_thunder_pki {
    local ca=$THUNDER_CA_DIR pki=$THUNDER_PKI_DIR host=$THUNDER_HOST
    if ! sudo test -f "$ca/ca-cert.pem"; then
        sudo install -d -m 0700 "$ca"
        _thunder_openssl req -x509 -newkey ec \
            -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout "$ca/ca-key.pem" -out "$ca/ca-cert.pem" \
            -subj /CN=thunder-ca -days 3650 \
            -addext basicConstraints=critical,CA:TRUE \
            -addext keyUsage=critical,keyCertSign,cRLSign
    fi
    sudo install -d -m 0700 "$pki"
    _thunder_openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -nodes -keyout "$pki/server-key.pem" -out "$pki/server.csr" \
        -subj "/CN=$host" \
        -addext "subjectAltName=DNS:$host,IP:$THUNDER_HOST_IP" \
        -addext keyUsage=critical,digitalSignature,keyEncipherment \
        -addext extendedKeyUsage=serverAuth,clientAuth
    _thunder_openssl x509 -req -in "$pki/server.csr" \
        -CA "$ca/ca-cert.pem" -CAkey "$ca/ca-key.pem" -CAcreateserial \
        -days 365 -copy_extensions copy -out "$pki/server-cert.pem"
    sudo cp "$ca/ca-cert.pem" "$pki/ca-cert.pem"
    sudo cp "$pki/server-cert.pem" "$pki/client-cert.pem"
    sudo cp -p "$pki/server-key.pem" "$pki/client-key.pem"
    sudo rm -f "$pki/server.csr"
}

# -- configuration ------------------------------------------------------------

function configure_nova_thunder {
    _thunder_rabbit_check_host "$THUNDER_HOST"
    _thunder_rabbit_check_secret
    sudo install -d -o "$STACK_USER" "$NOVA_THUNDER_CONF_DIR"
    local conf=$THUNDER_AGENT_CONF
    # They hold RabbitMQ passwords: readable by the stack user (and root).
    touch "$conf"
    chmod 0600 "$conf"
    iniset "$conf" DEFAULT debug "$ENABLE_DEBUG_LOG_LEVEL"
    iniset "$conf" DEFAULT host "$THUNDER_HOST"
    iniset "$conf" DEFAULT transport_url \
        "$(nova_thunder_transport_url "thunder-agent.$THUNDER_HOST")"
    iniset "$conf" agent backend "$THUNDER_BACKEND"
    iniset "$conf" agent state_path "$THUNDER_STATE_PATH"
    iniset "$conf" agent run_path "$THUNDER_RUN_PATH"
    iniset "$conf" agent file_origin_dirs "$THUNDER_GLANCE_IMAGE_DIR"
    iniset "$conf" cache size_limit_mb "$THUNDER_CACHE_SIZE_MB"
    iniset "$conf" tls enabled "$THUNDER_TLS"
    if [[ "$THUNDER_TLS" == "True" ]]; then
        _thunder_check_ip "$THUNDER_HOST_IP"
        create_nova_thunder_pki
        iniset "$conf" tls certificates_dir "$THUNDER_PKI_DIR"
    fi

    if is_service_enabled thunder-coordinator; then
        conf=$THUNDER_COORDINATOR_CONF
        touch "$conf"
        chmod 0600 "$conf"
        iniset "$conf" DEFAULT debug "$ENABLE_DEBUG_LOG_LEVEL"
        iniset "$conf" DEFAULT transport_url \
            "$(nova_thunder_transport_url thunder-coordinator)"
        iniset "$conf" tls enabled "$THUNDER_TLS"
        if [[ "$THUNDER_TLS" == "True" ]]; then
            iniset "$conf" tls certificates_dir "$THUNDER_PKI_DIR"
        fi
    fi

    # nova-compute side; the agent and nova-compute share [DEFAULT] host.
    iniset "$NOVA_CPU_CONF" thunder enabled True
    iniset "$NOVA_CPU_CONF" thunder backend "$THUNDER_BACKEND"
    iniset "$NOVA_CPU_CONF" thunder volume_types "$THUNDER_VOLUME_TYPE"
    iniset "$NOVA_CPU_CONF" thunder image_origin "$THUNDER_IMAGE_ORIGIN"
    iniset "$NOVA_CPU_CONF" thunder agent_host "$THUNDER_HOST"
    # nova-compute accepts only disks laid out where the agent keeps them.
    iniset "$NOVA_CPU_CONF" thunder agent_state_path "$THUNDER_STATE_PATH"
    iniset "$NOVA_CPU_CONF" thunder agent_run_path "$THUNDER_RUN_PATH"
    iniset "$NOVA_CPU_CONF" thunder transport_url \
        "$(nova_thunder_transport_url "thunder-nova.$THUNDER_HOST")"
    iniset "$NOVA_CPU_CONF" thunder control_exchange \
        "$THUNDER_CONTROL_EXCHANGE"
}

function start_nova_thunder {
    local bin
    bin=$(nova_thunder_bin_dir)
    run_process thunder-coordinator \
        "$bin/thunder-coordinator --config-file $THUNDER_COORDINATOR_CONF"
    # The agent runs data-plane daemons and, for the kernel backend,
    # device-mapper and iSCSI: root.
    run_process thunder-agent \
        "$bin/thunder-agent --config-file $THUNDER_AGENT_CONF" "" root
    if is_service_enabled n-cpu; then
        # Same service, same config; the wiring checks Nova before it
        # starts and refuses to run against internals it does not know.
        stop_process n-cpu
        run_process n-cpu \
            "$bin/nova-compute-thunder --config-file $NOVA_CPU_CONF" \
            "$LIBVIRT_GROUP"
    fi
}

function create_nova_thunder_volume_type {
    is_service_enabled c-api || return 0
    if ! openstack --os-cloud devstack-admin volume type show \
            "$THUNDER_VOLUME_TYPE" >/dev/null 2>&1; then
        openstack --os-cloud devstack-admin volume type create \
            --property "thunder:enabled=<is> True" \
            --property "multiattach=<is> True" \
            --description "Block devices served by nova-thunder" \
            "$THUNDER_VOLUME_TYPE"
    fi
}

function upload_nova_thunder_raw_image {
    [[ "$THUNDER_RAW_IMAGE" == "True" ]] || return 0
    is_service_enabled g-api || return 0
    local name=${DEFAULT_IMAGE_NAME}-raw
    if openstack --os-cloud devstack-admin image show "$name" \
            >/dev/null 2>&1; then
        return 0
    fi
    local tmp
    tmp=$(mktemp -d)
    openstack --os-cloud devstack-admin image save \
        --file "$tmp/image" "$DEFAULT_IMAGE_NAME"
    qemu-img convert -O raw "$tmp/image" "$tmp/image.raw"
    openstack --os-cloud devstack-admin image create --public \
        --disk-format raw --container-format bare \
        --file "$tmp/image.raw" "$name"
    rm -rf "$tmp"
}

function stop_nova_thunder {
    stop_process thunder-agent
    stop_process thunder-coordinator
}

function cleanup_nova_thunder {
    if is_service_enabled c-api && openstack --os-cloud devstack-admin \
            volume type show "$THUNDER_VOLUME_TYPE" >/dev/null 2>&1; then
        openstack --os-cloud devstack-admin volume type delete \
            "$THUNDER_VOLUME_TYPE"
    fi
    local opt
    for opt in "${NOVA_THUNDER_NOVA_OPTS[@]}"; do
        inidelete "$NOVA_CPU_CONF" thunder "$opt"
    done
    # The CA stays: other nodes' certificates come from it.
    sudo rm -rf "$THUNDER_STATE_PATH" "$THUNDER_RUN_PATH" \
        "$NOVA_THUNDER_CONF_DIR"
}

# The node running RabbitMQ creates every user, whether or not it runs an
# agent (its configuration needs the broker running: post-config).
if [[ "$1" == "stack" && "$2" == "post-config" ]] && \
        [[ "$THUNDER_RABBIT_USERS" == "True" ]] && is_service_enabled rabbit; then
    echo_summary "Creating the RabbitMQ users of nova-thunder"
    create_nova_thunder_rabbit_users
fi

if is_service_enabled thunder-agent; then
    if [[ "$1" == "stack" && "$2" == "install" ]]; then
        echo_summary "Installing nova-thunder"
        install_nova_thunder
    elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
        echo_summary "Configuring nova-thunder"
        configure_nova_thunder
    elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
        echo_summary "Starting nova-thunder"
        start_nova_thunder
        create_nova_thunder_volume_type
        upload_nova_thunder_raw_image
    fi

    if [[ "$1" == "unstack" ]]; then
        stop_nova_thunder
    fi

    if [[ "$1" == "clean" ]]; then
        cleanup_nova_thunder
    fi
fi
