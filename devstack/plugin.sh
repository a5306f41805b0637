#!/bin/bash
# shellcheck disable=SC2154
# (devstack defines the variables this file reads, e.g. DEST, NOVA_CPU_CONF)
#
# devstack plugin for nova-thunder.
#
#   enable_plugin nova-thunder file:///opt/stack/nova-thunder
#
# stack install      installs the project
# stack post-config  writes thunder-agent.conf and [thunder] of nova-cpu.conf
# stack extra        starts thunder-coordinator and thunder-agent, restarts
#                    n-cpu as nova-compute-thunder, creates the volume type
# unstack            stops the agent and the coordinator
# clean              also removes the volume type, the agent's state and the
#                    [thunder] options

NOVA_THUNDER_NOVA_OPTS=(enabled backend volume_types image_origin
                        agent_state_path agent_run_path
                        transport_url control_exchange)

function nova_thunder_bin_dir {
    get_python_exec_prefix
}

function install_nova_thunder {
    setup_develop "$NOVA_THUNDER_DIR"
}

function configure_nova_thunder {
    sudo install -d -o "$STACK_USER" "$NOVA_THUNDER_CONF_DIR"
    local conf=$THUNDER_AGENT_CONF
    iniset "$conf" DEFAULT debug "$ENABLE_DEBUG_LOG_LEVEL"
    iniset "$conf" DEFAULT transport_url "$(get_transport_url)"
    iniset "$conf" agent backend "$THUNDER_BACKEND"
    iniset "$conf" agent state_path "$THUNDER_STATE_PATH"
    iniset "$conf" agent run_path "$THUNDER_RUN_PATH"
    iniset "$conf" agent file_origin_dirs "$THUNDER_GLANCE_IMAGE_DIR"
    iniset "$conf" cache size_limit_mb "$THUNDER_CACHE_SIZE_MB"

    # nova-compute side; the agent and nova-compute share [DEFAULT] host.
    iniset "$NOVA_CPU_CONF" thunder enabled True
    iniset "$NOVA_CPU_CONF" thunder backend "$THUNDER_BACKEND"
    iniset "$NOVA_CPU_CONF" thunder volume_types "$THUNDER_VOLUME_TYPE"
    iniset "$NOVA_CPU_CONF" thunder image_origin "$THUNDER_IMAGE_ORIGIN"
    # nova-compute accepts only disks laid out where the agent keeps them.
    iniset "$NOVA_CPU_CONF" thunder agent_state_path "$THUNDER_STATE_PATH"
    iniset "$NOVA_CPU_CONF" thunder agent_run_path "$THUNDER_RUN_PATH"
    iniset "$NOVA_CPU_CONF" thunder transport_url "$(get_transport_url)"
    iniset "$NOVA_CPU_CONF" thunder control_exchange openstack
}

function start_nova_thunder {
    local bin
    bin=$(nova_thunder_bin_dir)
    run_process thunder-coordinator \
        "$bin/thunder-coordinator --config-file $THUNDER_AGENT_CONF"
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
    sudo rm -rf "$THUNDER_STATE_PATH" "$THUNDER_RUN_PATH" \
        "$NOVA_THUNDER_CONF_DIR"
}

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
