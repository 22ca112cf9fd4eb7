# fulcrum in a scratch image: one statically linked binary, no shell, no libc, no package manager.
#
# The binary is built on the host (no image registry is reachable to pull a Rust builder image):
# `scripts/build-image` runs the static release build into target/static and then this file.
# Building by hand:
#
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
#       --target x86_64-unknown-linux-gnu --target-dir target/static
#   docker build -t fulcrum .
#
# Config and certificates are mounted: the config at /etc/fulcrum/fulcrum.toml (relative paths in
# it resolve against /etc/fulcrum), the PKI under /etc/fulcrum/certs. The same image runs the
# balancer (`run`), config checks (`check`), the development PKI (`certs`) and demo backends
# (`backend`).
#
# Name resolution: static glibc (2.36 here) has the `files` and `dns` lookups built in, so backends
# named by host name resolve through the container's /etc/hosts and /etc/resolv.conf (Docker's DNS
# for service names included); loadable NSS modules (mdns, resolve, ldap, ...) are not available.
# IP literals never resolve anything. scripts/docker-smoke checks an /etc/hosts name.
FROM scratch

ARG BINARY=target/static/x86_64-unknown-linux-gnu/release/fulcrum

COPY ${BINARY} /usr/local/bin/fulcrum

ENV PATH=/usr/local/bin
# Plain log lines (no ANSI colours) for `docker logs` and log collectors.
ENV NO_COLOR=1
WORKDIR /etc/fulcrum
# Not root: a numeric user needs no /etc/passwd. `--cap-add NET_BIND_SERVICE` does not reach a
# non-root user, so bind ports >= 1024 and publish them (`-p 443:8443`), or, with host
# networking, lower the host's net.ipv4.ip_unprivileged_port_start.
USER 65532:65532
ENTRYPOINT ["fulcrum"]
CMD ["run", "--config", "/etc/fulcrum/fulcrum.toml"]
