// Gloo (CPU, TCP transport) communicator. Built only when CMake finds Gloo (MF_HAS_GLOO); the
// files are named gloo_* so the build leaves them out otherwise.
//
// Connection setup goes through our TcpStore (adapter to gloo::rendezvous::Store, keys under a
// per-communicator prefix "gloo/<n>/"). The local address that peers connect to is, in order:
//   GLOO_SOCKET_IFNAME (interface name, as in PyTorch), MF_GLOO_HOSTNAME (host or IP),
//   127.0.0.1 when the master address is a loopback one, else the local IP of the route to the
//   master (so a hostname that /etc/hosts maps to 127.0.1.1 does not break multi-node jobs).
// Collectives time out after MF_COMM_TIMEOUT seconds (default 1800: ranks may legitimately wait
// while rank 0 evaluates or writes a checkpoint).
#pragma once
#include <chrono>
#include <memory>
#include <string>

#include "dist/communicator.h"

namespace mf {

struct DistEnv;
class TcpStore;

std::unique_ptr<Communicator> make_gloo_communicator(const DistEnv& env, TcpStore& store);

// Explicit form (tests): `hostname` is the address this rank listens on for its peers.
std::unique_ptr<Communicator> make_gloo_communicator(int rank, int size, TcpStore& store,
                                                     const std::string& hostname,
                                                     std::chrono::milliseconds op_timeout);

}  // namespace mf
