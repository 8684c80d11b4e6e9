// cuemu: the part of NCCL's API that src/dist/nccl_comm.cpp uses, for processes that run the CUDA
// backend on the CPU emulator (nccl_emu.cpp). The ranks are processes on one machine; rank 0
// relays every collective over loopback TCP and reduces in rank order. Collectives are queued on
// their stream and run late (streams.cpp), as a slow link would make them. Float32 only.
#pragma once
#include <cstddef>

#include "cuda_runtime.h"

#define ncclGetUniqueId cuemu_ncclGetUniqueId
#define ncclCommInitRankConfig cuemu_ncclCommInitRankConfig
#define ncclCommFinalize cuemu_ncclCommFinalize
#define ncclCommDestroy cuemu_ncclCommDestroy
#define ncclCommAbort cuemu_ncclCommAbort
#define ncclCommGetAsyncError cuemu_ncclCommGetAsyncError
#define ncclGetErrorString cuemu_ncclGetErrorString
#define ncclGetLastError cuemu_ncclGetLastError
#define ncclAllReduce cuemu_ncclAllReduce
#define ncclReduceScatter cuemu_ncclReduceScatter
#define ncclAllGather cuemu_ncclAllGather
#define ncclBroadcast cuemu_ncclBroadcast
#define ncclGroupStart cuemu_ncclGroupStart
#define ncclGroupEnd cuemu_ncclGroupEnd

enum ncclResult_t { ncclSuccess = 0, ncclUnhandledCudaError = 1, ncclSystemError = 2, ncclInternalError = 3,
                    ncclInvalidArgument = 4, ncclInvalidUsage = 5, ncclRemoteError = 6, ncclInProgress = 7 };
enum ncclDataType_t { ncclInt8 = 0, ncclUint8 = 1, ncclInt32 = 2, ncclUint32 = 3, ncclInt64 = 4,
                      ncclUint64 = 5, ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9 };
constexpr ncclDataType_t ncclFloat = ncclFloat32;
enum ncclRedOp_t { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 };
struct ncclUniqueId { char internal[128]; };
using ncclComm_t = struct cuemuNcclComm*;
struct ncclConfig_t { int blocking = 1; };
#define NCCL_CONFIG_INITIALIZER ncclConfig_t{}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id);
ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, ncclConfig_t* config);
ncclResult_t ncclCommFinalize(ncclComm_t comm);
ncclResult_t ncclCommDestroy(ncclComm_t comm);
ncclResult_t ncclCommAbort(ncclComm_t comm);
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state);
const char* ncclGetErrorString(ncclResult_t r);
const char* ncclGetLastError(ncclComm_t comm);
ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, ncclDataType_t type, ncclRedOp_t op,
                               ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, ncclDataType_t type, ncclComm_t comm,
                           cudaStream_t stream);
ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root,
                           ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclGroupStart();
ncclResult_t ncclGroupEnd();
