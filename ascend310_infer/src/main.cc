/**
 * Ascend 310 runner for the exported Mask R-CNN (batch 1): for every preprocessed image, run the model and
 * store the kept detections with their 28x28 masks (see inc/utils.h for the file contract).
 *
 * Built against the MindSpore inference C++ API (include/api/model.h; MindSpore Lite on current releases):
 *   main --model_path=maskrcnn.mindir --input_dir=preprocess_result --result_dir=result_files --device_id=0
 */
#include <chrono>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "include/api/context.h"
#include "include/api/model.h"
#include "include/api/status.h"
#include "include/api/types.h"
#include "inc/utils.h"

namespace {

using maskrcnn::kNumOutputs;
using maskrcnn::kValidOutput;

// boxes, scores, labels, valid, masks: the order and types of the exported inference graph's outputs.
const std::vector<mindspore::DataType> kOutputTypes = {
    mindspore::DataType::kNumberTypeFloat32, mindspore::DataType::kNumberTypeFloat32,
    mindspore::DataType::kNumberTypeInt32, mindspore::DataType::kNumberTypeBool,
    mindspore::DataType::kNumberTypeFloat32};

mindspore::ModelType ModelTypeOf(const std::string &path) {
  auto ends_with = [&path](const std::string &suffix) {
    return path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (ends_with(".mindir")) return mindspore::ModelType::kMindIR;
  if (ends_with(".om")) return mindspore::ModelType::kOM;
  throw std::runtime_error("model '" + path + "' must end in .mindir or .om (convert an AIR file with atc first)");
}

void BuildModel(const maskrcnn::Options &options, mindspore::Model *model) {
  auto context = std::make_shared<mindspore::Context>();
  auto ascend = std::make_shared<mindspore::AscendDeviceInfo>();
  ascend->SetDeviceID(options.device_id);
  if (!options.precision_mode.empty()) ascend->SetPrecisionMode(options.precision_mode);
  context->MutableDeviceInfo().push_back(ascend);
  mindspore::Status status = model->Build(options.model_path, ModelTypeOf(options.model_path), context);
  if (status != mindspore::kSuccess) {
    throw std::runtime_error("cannot build model '" + options.model_path + "' on device " +
                             std::to_string(options.device_id) + ": " + status.ToString());
  }
}

// Wraps a file's bytes as the model input `like`, after checking the size matches.
mindspore::MSTensor InputTensor(const mindspore::MSTensor &like, const std::string &path, std::vector<char> *bytes) {
  *bytes = maskrcnn::ReadFile(path);
  if (bytes->size() != like.DataSize()) {
    throw std::runtime_error("'" + path + "' has " + std::to_string(bytes->size()) + " bytes, model input '" +
                             like.Name() + "' needs " + std::to_string(like.DataSize()) +
                             " (preprocessed with another image size?)");
  }
  return mindspore::MSTensor(like.Name(), like.DataType(), like.Shape(), bytes->data(), bytes->size());
}

void WriteKeptRows(const std::string &result_dir, const std::string &image_id,
                   const std::vector<mindspore::MSTensor> &outputs) {
  if (outputs.size() != kNumOutputs) {
    throw std::runtime_error("model returned " + std::to_string(outputs.size()) + " outputs, expected " +
                             std::to_string(kNumOutputs) + " (boxes, scores, labels, valid, masks)");
  }
  const mindspore::MSTensor &valid_tensor = outputs[kValidOutput];
  const int64_t rows = valid_tensor.ElementNum();
  auto valid_data = valid_tensor.Data();
  const auto *valid = static_cast<const uint8_t *>(valid_data.get());
  for (size_t i = 0; i < kNumOutputs; ++i) {
    const mindspore::MSTensor &out = outputs[i];
    const std::vector<int64_t> &shape = out.Shape();
    if (out.DataType() != kOutputTypes[i] || shape.size() < 2 || shape[0] != 1 || shape[1] != rows) {
      throw std::runtime_error("model output " + std::to_string(i) + " ('" + out.Name() +
                               "') has an unexpected type or shape; expected batch 1 with " + std::to_string(rows) +
                               " rows and the types of the exported graph (float32, float32, int32, bool, float32)");
    }
    const size_t row_bytes = rows > 0 ? out.DataSize() / static_cast<size_t>(rows) : 0;
    auto data = out.Data();
    maskrcnn::WriteFileAtomic(maskrcnn::OutputPath(result_dir, image_id, i),
                              maskrcnn::KeepRows(static_cast<const char *>(data.get()), static_cast<size_t>(rows),
                                                 row_bytes, valid));
  }
}

int Run(const maskrcnn::Options &options) {
  mindspore::Model model;
  BuildModel(options, &model);
  std::vector<mindspore::MSTensor> model_inputs = model.GetInputs();
  if (model_inputs.size() != 2) {
    throw std::runtime_error("model has " + std::to_string(model_inputs.size()) +
                             " inputs, expected 2 (image, image_shape)");
  }
  const std::vector<std::string> image_ids = maskrcnn::ListImageIds(options.input_dir);
  maskrcnn::EnsureDirectory(options.result_dir);
  double total_ms = 0.0;
  for (const std::string &image_id : image_ids) {
    std::vector<char> image_bytes;
    std::vector<char> shape_bytes;
    std::vector<mindspore::MSTensor> inputs = {
        InputTensor(model_inputs[0], maskrcnn::InputPath(options.input_dir, maskrcnn::kImageDir, image_id),
                    &image_bytes),
        InputTensor(model_inputs[1], maskrcnn::InputPath(options.input_dir, maskrcnn::kImageShapeDir, image_id),
                    &shape_bytes)};
    std::vector<mindspore::MSTensor> outputs;
    const auto start = std::chrono::steady_clock::now();
    mindspore::Status status = model.Predict(inputs, &outputs);
    total_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (status != mindspore::kSuccess) {
      throw std::runtime_error("inference failed on image " + image_id + ": " + status.ToString());
    }
    WriteKeptRows(options.result_dir, image_id, outputs);
  }
  const double mean_ms = total_ms / static_cast<double>(image_ids.size());
  std::cout << "inferred " << image_ids.size() << " images, mean " << mean_ms << " ms/image ("
            << 1000.0 / mean_ms << " images/s)" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char **argv) {
  try {
    return Run(maskrcnn::ParseOptions(argc, argv));
  } catch (const std::exception &err) {
    std::cerr << "ERROR: " << err.what() << std::endl;
    return 1;
  }
}
