// Layout conversion (src/ops/layout.py): BlockedToPlain(x) -> y, a (N, C, H, W) tensor held blocked (nChw16c, C a
// multiple of kBlockChannels) as NCHW; PlainToBlocked the other way (each is the other's gradient).
#include "common.h"

namespace maskrcnn_ops {
namespace {

enum Arg { kFrom, kTo, kArgs };

int Relayout(bool to_plain, int nparam, void **params, const int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != kArgs || ndims[kFrom] != 4 || !IsDtype(dtypes[kFrom], "float32") ||
      shapes[kFrom][1] % kBlockChannels != 0) {
    return kBadArguments;
  }
  Runtime &rt = GetRuntime();
  try {
    std::lock_guard<std::mutex> lock(rt.mutex);
    memory::dims dims = Dims(shapes[kFrom]);
    memory from(Held(dims, to_plain), rt.engine, params[kFrom]), to(Held(dims, !to_plain), rt.engine, params[kTo]);
    Reorder(rt, from, to, nullptr);
    rt.stream.wait();
    return kOk;
  } catch (const std::exception &error) {
    return ReportOneDnnFailure(error);
  }
}

}  // namespace
}  // namespace maskrcnn_ops

MASKRCNN_ENTRY_POINT(BlockedToPlain) { return maskrcnn_ops::Relayout(true, nparam, params, ndims, shapes, dtypes); }

MASKRCNN_ENTRY_POINT(PlainToBlocked) { return maskrcnn_ops::Relayout(false, nparam, params, ndims, shapes, dtypes); }
