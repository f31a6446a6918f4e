/** The status bar item: the active notebook kernel's GPU state, one line. */
import { INotebookTracker } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { statusText } from './statusline';
import { GPUModel } from './model';

export class GPUStatusItem extends Widget {
  constructor(model: GPUModel, tracker: INotebookTracker | null, onClick: () => void) {
    super();
    this._model = model;
    this._tracker = tracker;
    this.id = 'jp-gpuattach-status';
    this.addClass('jp-gpuattach-StatusItem');
    this.node.setAttribute('role', 'button');
    this.node.tabIndex = 0;
    this.node.addEventListener('click', onClick);
    this.node.addEventListener('keydown', (event: KeyboardEvent) => {
      if (event.key === 'Enter' || event.key === ' ') {
        onClick();
      }
    });
    model.changed.connect(this._render, this);
    tracker?.currentChanged.connect(this._render, this);
    this._render();
  }

  /** The kernel of the notebook last focused, if it has one. */
  get kernelId(): string | null {
    return this._tracker?.currentWidget?.sessionContext.session?.kernel?.id ?? null;
  }

  private _render(): void {
    const model = this._model;
    const status = statusText(this.kernelId, model.pool, model.leases, model.error, model.elapsed);
    if (this.node.textContent !== status.text) {
      this.node.textContent = status.text;
    }
    this.node.title = status.title;
    this.node.dataset.state = status.kind;
    this.node.dataset.level = status.level;
  }

  dispose(): void {
    this._model.changed.disconnect(this._render, this);
    this._tracker?.currentChanged.disconnect(this._render, this);
    super.dispose();
  }

  private _model: GPUModel;
  private _tracker: INotebookTracker | null;
}
