#include "model/params.h"

namespace mf {

const char* param_kind_name(ParamKind k) {
  switch (k) {
    case ParamKind::Embedding: return "embedding";
    case ParamKind::LmHead: return "lm_head";
    case ParamKind::Hidden: return "hidden";
    case ParamKind::Norm: return "norm";
    case ParamKind::Router: return "router";
    case ParamKind::Bias: return "bias";
  }
  return "?";
}

}  // namespace mf
