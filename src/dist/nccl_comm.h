// NCCL communicator (GPU). Compiled only in CUDA builds that found NCCL (MF_HAS_NCCL); the files
// are named nccl_* so CMake adds them only then. No CUDA headers here, so any file may include it.
#pragma once
#include <memory>

#include "dist/communicator.h"

namespace mf {

struct DistEnv;
class TcpStore;

// Uses the CUDA device current at the call (select it from env.local_rank first) and runs every
// collective on `cuda_stream` (a cudaStream_t; null = the legacy default stream). Rank 0 creates
// NCCL's unique id and publishes it in the store; the others read it from there. Initialisation
// is non-blocking and bounded (max(MF_STORE_TIMEOUT, 120 s)), so a missing rank ends in an error.
// Every queued collective is watched (dist/watchdog.h): one still running MF_COMM_TIMEOUT seconds
// after it was queued, or an asynchronous NCCL error, ends the process with exit code 1 and a
// message naming the collective, instead of a hang the launcher cannot see.
// Float pointers are device memory; allgather_bytes/broadcast_bytes (host strings) go through the
// store.
std::unique_ptr<Communicator> make_nccl_communicator(const DistEnv& env, TcpStore& store,
                                                     void* cuda_stream);

}  // namespace mf
