// An NVTX injection library: host time (inclusive and exclusive) by range name. MLX's CUDA
// backend marks gpu::eval around every array it encodes, <Primitive>::eval_gpu inside it, and
// CommandEncoder::commit (each CUDA graph it launches); loaded through NVTX_INJECTION64_PATH,
// this counts them. tools/bench_host_profile.py builds it (g++) and reads it (ctypes).
// Self-contained: the few NVTX ABI types it needs are spelled out below (nvToolsExt.h).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#define EXPORT extern "C" __attribute__((visibility("default")))

typedef void (*NvtxFunctionPointer)(void);
typedef NvtxFunctionPointer** NvtxFunctionTable;
typedef const void* (*NvtxGetExportTableFunc_t)(uint32_t export_table_id);
struct NvtxExportTableCallbacks {
  size_t struct_size;
  int (*GetModuleFunctionTable)(int module, NvtxFunctionTable* out_table, unsigned int* out_size);
};
struct nvtxEventAttributes_t {
  uint16_t version, size;
  uint32_t category;
  int32_t colorType;
  uint32_t color;
  int32_t payloadType, reserved0;
  uint64_t payload;
  int32_t messageType;
  const char* message;  // ascii when messageType == 1
};
constexpr uint32_t ETID_CALLBACKS = 1;
constexpr int CB_MODULE_CORE2 = 5, CBID_CORE2_DOMAIN_RANGE_PUSH_EX = 4, CBID_CORE2_DOMAIN_RANGE_POP = 5;
constexpr int32_t MESSAGE_TYPE_ASCII = 1;

using Clock = std::chrono::steady_clock;
struct Stat { double inclusive = 0, exclusive = 0; long count = 0; };
struct Frame { const char* name; Clock::time_point start; double children; };
static thread_local std::vector<Frame> open_ranges;
static std::mutex stats_mutex;
static std::unordered_map<std::string, Stat> stats;
static std::unordered_map<const char*, Stat*> stats_by_literal;  // MLX names its ranges by literals

static int push(void*, const nvtxEventAttributes_t* a) {
  const char* name = a && a->messageType == MESSAGE_TYPE_ASCII && a->message ? a->message : "?";
  open_ranges.push_back({name, Clock::now(), 0.0});
  return (int)open_ranges.size();
}

static int pop(void*) {
  if (open_ranges.empty()) return -1;
  Frame f = open_ranges.back();
  open_ranges.pop_back();
  double us = std::chrono::duration<double, std::micro>(Clock::now() - f.start).count();
  if (!open_ranges.empty()) open_ranges.back().children += us;
  std::lock_guard<std::mutex> lock(stats_mutex);
  auto it = stats_by_literal.find(f.name);
  Stat* s = it != stats_by_literal.end() ? it->second : (stats_by_literal[f.name] = &stats[f.name]);
  s->inclusive += us;
  s->exclusive += us - f.children;
  s->count += 1;
  return (int)open_ranges.size();
}

EXPORT void nvtx_stats_reset() {
  std::lock_guard<std::mutex> lock(stats_mutex);
  for (auto& kv : stats) kv.second = Stat{};
}

// name, count, inclusive and exclusive microseconds, tab-separated; 1 on success.
EXPORT int nvtx_stats_dump(const char* path) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  FILE* f = std::fopen(path, "w");
  if (!f) return 0;
  std::fprintf(f, "name\tcount\tincl_us\texcl_us\n");
  for (auto& kv : stats)
    if (kv.second.count) std::fprintf(f, "%s\t%ld\t%.1f\t%.1f\n", kv.first.c_str(), kv.second.count, kv.second.inclusive, kv.second.exclusive);
  std::fclose(f);
  return 1;
}

// NVTX calls this once, on the first NVTX call of a library (MLX's), with its export table.
EXPORT int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get_export_table) {
  auto* callbacks = (const NvtxExportTableCallbacks*)get_export_table(ETID_CALLBACKS);
  NvtxFunctionTable table = nullptr;
  unsigned int size = 0;
  if (!callbacks || !callbacks->GetModuleFunctionTable(CB_MODULE_CORE2, &table, &size) || !table) return 0;
  if (size <= (unsigned int)CBID_CORE2_DOMAIN_RANGE_POP) return 0;
  *table[CBID_CORE2_DOMAIN_RANGE_PUSH_EX] = (NvtxFunctionPointer)push;
  *table[CBID_CORE2_DOMAIN_RANGE_POP] = (NvtxFunctionPointer)pop;
  return 1;
}
